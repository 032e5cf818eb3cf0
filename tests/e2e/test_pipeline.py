"""The whole pipeline as a user drives it: prompts in (SDK, gRPC and a plain console-style JSON
producer), teacher on the real Triton, Parquet shards, a KD-trained student, checkpoint events out,
bad input in the dead-letter topic. Real Kafka, real Triton, the services as separate processes."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import grpc
import pyarrow.parquet as pq
import pytest

from distillery.v1 import prompt_pb2, services_pb2, services_pb2_grpc
from services.common.config import DEAD_LETTERS
from services.common.kafka import make_consumer, make_producer
from services.sdk import Client
from services.stack.local import LocalStack, StackConfig
from services.stack.models import task_prompts
from services.stack.processes import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(kafka_broker, triton_server, model_dirs, tmp_path_factory):
    teacher_dir, student_dir = model_dirs
    config = StackConfig(
        data_dir=tmp_path_factory.mktemp("stack"),
        topic_prefix=f"e2e{uuid.uuid4().hex[:6]}.",
        external_kafka=kafka_broker.bootstrap,
        external_triton=triton_server.grpc_url,
        teacher_model_dir=teacher_dir,
        student_dir=student_dir,
        producer_grpc_port=None,
        trainer_grpc_port=None,
        teacher_replicas=2,
        settings={"SHARD_MAX_ROWS": "12", "SHARD_MAX_AGE_S": "3", "LOG_LEVEL": "INFO"},
        service_settings={"trainer": {"RUN_ID": "e2e", "BATCH_SIZE": "8"}},
    )
    with LocalStack(config) as running:
        yield running
        for process in running.dead_processes():
            print(f"{process.name} died:\n{process.log_tail(60)}")


def _dead_letters(stack, expected: int) -> list:
    consumer = make_consumer(stack.settings(), f"t-{uuid.uuid4().hex[:6]}", "t-dlq")
    consumer.subscribe([stack.settings().topic(DEAD_LETTERS)])
    records: list = []

    def enough():
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
        return len(records) >= expected

    try:
        wait_for(enough, timeout=120, what=f"{expected} dead letters")
    finally:
        consumer.close()
    return records


def test_prompts_in_checkpoints_out(stack):
    prompts = task_prompts(30, seed=3)
    prompts = prompts + [prompts[0], prompts[1]]  # pushed twice: one dataset row each
    with Client(settings=stack.settings()) as client:
        summary = client.submit(prompts)
        rejected = client.submit([{"prompt": ""}, {"prompt": "x", "temperature": -1}])
    assert summary.accepted == 32 and summary.rejected == 0
    assert rejected.accepted == 0 and rejected.rejected == 2
    assert [r.reason.split(":")[0] for r in rejected.rejections] == ["empty-prompt", "invalid-parameter"]
    unique_ids = set(summary.accepted_ids)
    assert len(unique_ids) == 30

    # the gRPC PromptService takes a client stream and answers with counts and reasons
    with grpc.insecure_channel(stack.endpoints["producer"]) as channel:
        stub = services_pb2_grpc.PromptServiceStub(channel)
        grpc_summary = stub.Submit(iter([prompt_pb2.Prompt(id="grpc-1", text="reverse: q w e"),
                                         prompt_pb2.Prompt(id="grpc-2", text="   ")]), timeout=60)
    assert grpc_summary.accepted == 1 and grpc_summary.rejected == 1
    assert grpc_summary.rejections[0].reason.startswith("empty-prompt")
    unique_ids.add("grpc-1")

    # a plain console producer: JSON without headers, plus garbage
    producer = make_producer(stack.settings(), "t-console")
    topic = stack.settings().topic("prompts")
    producer.send(topic, key=b"console-1", value=json.dumps({"id": "console-1", "prompt": "sort: 3 1 2"}).encode())
    producer.send(topic, key=b"bad-1", value=b"{not json")
    producer.send(topic, key=b"bad-2", value=json.dumps({"prompt": "x", "max_new_tokens": -5}).encode())
    producer.flush()
    producer.close()
    unique_ids.add("console-1")

    seen = []

    def covered(event):
        return {s.shard_id for s in event.shards}

    for event in Client(settings=stack.settings()).checkpoints(timeout=300, stop=lambda: bool(stack.dead_processes())):
        seen.append(event)
        if sum(s.record_count for s in event.shards) >= len(unique_ids):
            break
    assert not stack.dead_processes(), [p.log_tail() for p in stack.dead_processes()]
    assert seen, "no checkpoint event arrived"
    last = seen[-1]

    # the dataset holds exactly one row per prompt id
    dataset_dir = stack.data_dir / "datasets" / "default"
    shards = sorted(dataset_dir.glob("*.parquet"))
    table = pq.read_table(shards) if len(shards) == 1 else __import__("pyarrow").concat_tables(
        [pq.read_table(p) for p in shards])
    ids = table.column("prompt_id").to_pylist()
    assert sorted(ids) == sorted(unique_ids)
    row = table.slice(0, 1).to_pylist()[0]
    assert row["teacher_revision"] and row["teacher_tokenizer_hash"] and row["teacher_vocab_size"] > 0
    assert row["topk_k"] == 20 and len(row["topk_ids"]) == 20 * len(row["completion_token_ids"])
    assert row["received_at"] and row["generated_at"] and row["written_at"]
    assert row["triton_version"]

    # loadable with datasets
    import datasets

    loaded = datasets.load_dataset("parquet", data_files=[str(p) for p in shards], split="train")
    assert len(loaded) == len(unique_ids)

    # every shard covered once by the final checkpoint, which loads
    assert len(covered(last)) == len(last.shards) == len(shards)
    from transformers import AutoModelForCausalLM

    model_dir = Path(last.uri.removeprefix("file://"))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    generated = model.generate(**tokenizer("sort: c b a =", return_tensors="pt"), max_new_tokens=4,
                               do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > 0
    assert not list(model_dir.glob("*.bin")) and not list(model_dir.glob("*.pt"))
    lineage = json.loads((model_dir / "lineage.json").read_text())
    assert {s["shard_id"] for s in lineage["shards"]} == covered(last)
    assert last.metrics.eval_rows >= 0 and last.teacher.revision

    # two teacher-inference replicas split the partitions and answered every prompt exactly once
    assigned = []
    for process in stack.processes["teacher"]:
        lines = [json.loads(line) for line in process.log_path.read_text().splitlines() if line.startswith("{")]
        parts = [set(e["partitions"]) for e in lines if e.get("event") == "partitions_assigned"]
        assert parts and parts[-1], f"{process.name} got no partitions"
        assigned.append(parts[-1])
    assert not (assigned[0] & assigned[1]) and assigned[0] | assigned[1] == {0, 1, 2, 3}
    outputs = make_consumer(stack.settings(), f"t-{uuid.uuid4().hex[:6]}", "t-outputs")
    outputs.subscribe([stack.settings().topic("teacher-outputs")])
    answered: list[str] = []

    def all_answered():
        for batch in outputs.poll(timeout_ms=500).values():
            answered.extend(r.key.decode() for r in batch)
        return set(answered) >= unique_ids

    try:
        wait_for(all_answered, timeout=60, what="teacher outputs of every prompt")
    finally:
        outputs.close()
    duplicates_ = {i for i in answered if answered.count(i) > 1}
    # a prompt pushed twice has the same id: it is answered twice and deduplicated by the sink
    assert duplicates_ <= {summary.accepted_ids[0], summary.accepted_ids[1]}, duplicates_

    # bad input ended in the dead-letter topic with reasons
    dead = _dead_letters(stack, 2)
    reasons = {dict(r.headers)["dlq-reason"].decode() for r in dead}
    assert {"malformed-json", "invalid-parameter"} <= reasons
    assert all(dict(r.headers)["dlq-stage"] == b"teacher" for r in dead)

    # TrainerService lists the checkpoints it announced
    with grpc.insecure_channel(stack.endpoints["trainer"]) as channel:
        stub = services_pb2_grpc.TrainerServiceStub(channel)
        listed = stub.ListCheckpoints(services_pb2.ListCheckpointsRequest(), timeout=30)
        status = stub.GetStatus(services_pb2.GetStatusRequest(), timeout=30)
    assert last.step in {c.step for c in listed.checkpoints}
    assert status.run_id == "e2e" and status.step >= last.step


BAD_INPUT = [
    # (key, value, headers, expected dead-letter reason)
    (b"bad-json", b"{not json", [], "malformed-json"),
    (b"bad-trunc", prompt_pb2.Prompt(id="bad-trunc", text="hello world, a longer prompt").SerializeToString()[:-5],
     [("content-type", b"application/x-protobuf")], "malformed-protobuf"),
    (b"bad-schema", b'{"prompt": "x"}', [("content-type", b"application/json"),
                                         ("schema", b"distillery.v1.ShardReady")], "wrong-schema"),
    (b"bad-utf8", b'{"prompt": "\xff\xfe"}', [("content-type", b"application/json")], "invalid-utf8"),
    (b"bad-empty", b'{"prompt": ""}', [], "empty-prompt"),
    (b"bad-huge", json.dumps({"prompt": "x" * 40_000}).encode(), [], "prompt-too-large"),
    (b"bad-negative", b'{"prompt": "x", "max_new_tokens": -5}', [], "invalid-parameter"),
    (b"bad-absurd", b'{"prompt": "x", "temperature": 1e9}', [], "invalid-parameter"),
    (b"bad-unknown", b'{"prompt": "x", "beam_width": 4}', [], "unknown-field"),
    (b"bad-unknown-pb", prompt_pb2.Prompt(id="u", text="x").SerializeToString() + b"\xf8\x3f\x01",
     [("content-type", b"application/x-protobuf")], "unknown-field"),
    (b"bad-array", b"[1, 2, 3]", [("content-type", b"application/json")], "schema-invalid"),
    (b"bad-tombstone", None, [], "empty"),
]


def test_bad_input_corpus_ends_in_dead_letters_and_the_pipeline_keeps_moving(stack):
    producer = make_producer(stack.settings(), "t-corpus")
    topic = stack.settings().topic("prompts")
    for key, value, headers, _ in BAD_INPUT:
        producer.send(topic, key=key, value=value, headers=headers)
    # duplicate ids with different content: the first wins, one dataset row
    producer.send(topic, key=b"dup-1", value=json.dumps({"id": "dup-1", "prompt": "sort: b a ="}).encode())
    producer.send(topic, key=b"dup-1", value=json.dumps({"id": "dup-1", "prompt": "sort: z y ="}).encode())
    producer.send(topic, key=b"after-bad", value=json.dumps({"id": "after-bad", "prompt": "add: 2+3 ="}).encode())
    producer.flush()
    producer.close()

    expected = {key.decode(): reason for key, _, _, reason in BAD_INPUT}
    consumer = make_consumer(stack.settings(), f"t-{uuid.uuid4().hex[:6]}", "t-corpus-dlq")
    consumer.subscribe([stack.settings().topic(DEAD_LETTERS)])
    seen: dict[str, str] = {}

    def all_dead_lettered():
        for batch in consumer.poll(timeout_ms=500).values():
            for r in batch:
                key = r.key.decode() if r.key else ""
                if key in expected:
                    seen[key] = dict(r.headers)["dlq-reason"].decode()
                    assert dict(r.headers)["dlq-source-topic"].decode() == topic
                    assert r.value == next(v for k, v, _, _ in BAD_INPUT if k == r.key), "original bytes kept"
        return len(seen) == len(expected)

    try:
        wait_for(all_dead_lettered, timeout=120, what="the bad-input corpus in the dead-letter topic")
    finally:
        consumer.close()
    assert seen == expected

    dataset_dir = stack.data_dir / "datasets" / "default"

    def ids():
        return [i for p in dataset_dir.glob("*.parquet") for i in pq.read_table(p).column("prompt_id").to_pylist()]

    wait_for(lambda: {"after-bad", "dup-1"} <= set(ids()), timeout=180, what="good prompts after the bad ones")
    assert ids().count("dup-1") == 1 and ids().count("after-bad") == 1
    assert not stack.dead_processes()


def test_dlq_lists_and_resubmits(stack, monkeypatch, capsys):
    from services.stack.cli import main

    monkeypatch.setenv("DISTILL_TOPIC_PREFIX", stack.config.topic_prefix)
    bootstrap = stack.endpoints["kafka"]
    assert main(["dlq", "--bootstrap", bootstrap, "--reason", "empty-prompt"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed and all(entry["reason"] == "empty-prompt" and entry["stage"] == "teacher" for entry in listed)
    assert all(entry["source"].startswith(stack.settings().topic("prompts") + ":") for entry in listed)
    before = len(listed)
    # re-submitting puts the original record back on distill.prompts; still empty, it is refused again
    assert main(["dlq", "--bootstrap", bootstrap, "--reason", "empty-prompt", "--resubmit"]) == 0
    capsys.readouterr()

    def again():
        main(["dlq", "--bootstrap", bootstrap, "--reason", "empty-prompt"])
        return len(capsys.readouterr().out.splitlines()) >= 2 * before

    wait_for(again, timeout=120, interval=1, what="re-submitted dead letters refused again")
