"""Chaos: kill -9 every process of the pipeline at seeded random moments while prompts flow, restart
it, and check at the end that nothing was lost or duplicated.

Short form in `make test` (about 60 prompts, a handful of kills); long form with `make chaos`
(DISTILL_CHAOS=long: 1,000 prompts, at least 10 kills including the broker). The seed is printed;
DISTILL_CHAOS_SEED=<seed> replays a run."""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from distillery.v1 import dataset_pb2
from services.common import codec
from services.common.config import SHARDS
from services.common.kafka import make_consumer
from services.sdk import Client
from services.stack.local import LocalStack, StackConfig
from services.stack.models import task_prompts
from services.stack.processes import wait_for

pytestmark = pytest.mark.e2e

LONG = os.environ.get("DISTILL_CHAOS") == "long"
PROMPTS = 1000 if LONG else 60
KILLS = 12 if LONG else 4
TARGETS = ("teacher-0", "teacher-1", "sink-0", "trainer-0", "triton", "kafka")


def _kill_and_restart(stack: LocalStack, target: str) -> float:
    """kill -9 the target, restart it, and return the seconds until it serves again."""
    started = time.monotonic()
    if target == "kafka":
        stack.broker.kill()
        stack.broker.start()
    elif target == "triton":
        stack.triton.kill()
        stack.triton.start()
    else:
        name, index = target.rsplit("-", 1)
        stack.processes[name][int(index)].kill()
        stack.wait_ready(stack.start_service(name, int(index)))
    return time.monotonic() - started


def test_nothing_lost_nothing_duplicated(tmp_path, model_dirs):
    seed = int(os.environ.get("DISTILL_CHAOS_SEED", random.SystemRandom().randrange(1 << 30)))
    print(f"chaos seed: {seed} (replay with DISTILL_CHAOS_SEED={seed})")
    rng = random.Random(seed)
    teacher_dir, student_dir = model_dirs
    config = StackConfig(
        data_dir=tmp_path / "stack", topic_prefix=f"chaos{uuid.uuid4().hex[:6]}.", kafka_port=None,
        triton_grpc_port=None, producer_grpc_port=None, trainer_grpc_port=None, teacher_replicas=2,
        teacher_model_dir=teacher_dir, student_dir=student_dir,
        settings={"SHARD_MAX_ROWS": "15", "SHARD_MAX_AGE_S": "2", "LOG_LEVEL": "INFO"},
        service_settings={"trainer": {"RUN_ID": "chaos", "BATCH_SIZE": "8"}},
    )
    prompts = task_prompts(PROMPTS, seed=seed % 1000, chat_every=0)
    for i, p in enumerate(prompts):
        p["id"] = f"c-{i}"
    with LocalStack(config) as stack:
        client = Client(settings=stack.settings())
        chunks = [prompts[i::KILLS + 1] for i in range(KILLS + 1)]
        kills = []
        for chunk in chunks:
            client.submit(chunk)
            if len(kills) < KILLS:
                time.sleep(rng.uniform(0.5, 4.0))
                target = TARGETS[len(kills) % len(TARGETS)] if LONG and len(kills) < len(TARGETS) else rng.choice(TARGETS)
                kills.append(target)
                recovered = _kill_and_restart(stack, target)
                print(f"kill -9 {target}: serving again after {recovered:.1f}s")
                client.close()
                client = Client(settings=stack.settings())
        client.close()
        ids = {p["id"] for p in prompts}
        dataset = stack.data_dir / "datasets" / "default"

        def rows() -> list[str]:
            return [i for p in dataset.glob("*.parquet") for i in pq.read_table(p).column("prompt_id").to_pylist()]

        def latest_lineage() -> dict | None:
            found = sorted((stack.data_dir / "runs" / "chaos").glob("step-*/lineage.json"))
            return json.loads(found[-1].read_text()) if found else None

        def done():
            for process in stack.dead_processes():  # a service the chaos left dead: restart it
                name, index = process.name.rsplit("-", 1)
                stack.start_service(name, int(index))
            lineage = latest_lineage()
            return set(rows()) >= ids and lineage and sum(s["record_count"] for s in lineage["shards"]) >= len(ids)

        drain_started = time.monotonic()
        wait_for(done, timeout=1800 if LONG else 600, interval=2, what=f"{len(ids)} prompts through the chaos")
        print(f"all prompts trained {time.monotonic() - drain_started:.0f}s after the last submission")
        dataset_ids = rows()
        assert sorted(dataset_ids) == sorted(ids), "every prompt exactly once, no extra rows"

        # every shard announced on distill.shards is in the final lineage exactly once
        consumer = make_consumer(stack.settings(), f"t-{uuid.uuid4().hex[:6]}", "t-chaos")
        consumer.subscribe([stack.settings().topic(SHARDS)])
        announced: set[str] = set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                announced |= {codec.decode(r.value, r.headers, dataset_pb2.ShardReady).shard_id for r in batch}
        consumer.close()
        lineage = latest_lineage()
        trained = [s["shard_id"] for s in lineage["shards"]]
        assert len(trained) == len(set(trained)), "no shard trained twice"
        assert set(trained) == announced == {p.name.removesuffix(".parquet") for p in dataset.glob("*.parquet")}

        from transformers import AutoModelForCausalLM

        final = sorted((stack.data_dir / "runs" / "chaos").glob("step-*"))[-1]
        assert AutoModelForCausalLM.from_pretrained(Path(final)) is not None
        print(f"chaos ok: {len(ids)} prompts, kills {kills}, {len(trained)} shards, seed {seed}")
