"""`distill demo` (`make demo`): the main job, end to end, on this machine.

Makes the small teacher and student (once, cached under <data-dir>/models), starts Kafka, Triton
and the four services in a fresh <data-dir>/demo folder, submits a generated prompt set through
the SDK, follows the trained-checkpoint events until the student has trained on every prompt, prints
how its agreement with the teacher rises, writes the training-data report, and stops everything.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from services.common.logging import get_logger

log = get_logger(__name__)


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run_demo(config, prompts: int = 400, timeout: float = 900.0, seed: int = 7) -> int:
    from services.sdk import Client
    from services.stack.local import LocalStack
    from services.stack.models import ensure_models, task_prompts

    root = config.data_dir.resolve()
    started = time.monotonic()
    _say(f"[demo] making or reusing the small teacher and student under {root / 'models'}")
    teacher_dir, student_dir = ensure_models(root / "models", train_seconds=config.teacher_train_seconds)
    demo_dir = root / "demo"
    if demo_dir.exists():
        shutil.rmtree(demo_dir)
    rows_per_shard = max(20, prompts // 5)
    stack_config = replace(
        config,
        data_dir=demo_dir,
        teacher_model_dir=teacher_dir,
        student_dir=student_dir,
        kafka_port=None,
        triton_grpc_port=None,
        producer_grpc_port=None,
        trainer_grpc_port=None,
        settings={"SHARD_MAX_ROWS": str(rows_per_shard), "SHARD_MAX_AGE_S": "10", "LOG_LEVEL": "INFO",
                  **config.settings},
        service_settings={"trainer": {"RUN_ID": "demo", "EPOCHS_PER_SHARD": "4", "LR": "0.003"},
                          **config.service_settings},
    )
    _say(f"[demo] starting Kafka, Triton and the services under {demo_dir}")
    with LocalStack(stack_config) as stack:
        _say(f"[demo] endpoints: {stack.endpoints}")
        batch = task_prompts(prompts, seed=seed)
        from tqdm import tqdm

        from distillery.v1 import services_pb2

        summary = services_pb2.SubmitSummary()
        with Client(settings=stack.settings()) as client, tqdm(total=len(batch), desc="[demo] submitting",
                                                                 unit="prompt", file=sys.stdout) as bar:
            for start in range(0, len(batch), 50):
                chunk = client.submit(batch[start:start + 50])
                summary.accepted += chunk.accepted
                summary.rejected += chunk.rejected
                summary.accepted_ids.extend(chunk.accepted_ids)
                summary.rejections.extend(chunk.rejections)
                bar.update(len(batch[start:start + 50]))
        unique = len(set(summary.accepted_ids))
        _say(f"[demo] submitted {summary.accepted} prompts ({summary.rejected} rejected); {unique} distinct "
             f"(a prompt pushed twice is one dataset row)")
        # what a careless console producer might push: dead letters with their reasons, not a stall
        from services.common.kafka import make_producer

        raw = make_producer(stack.settings(), "distill-demo-raw")
        for value in (b"{not json", b'{"prompt": "sort: b a =", "beam_width": 4}'):
            raw.send(stack.settings().topic("prompts"), value=value).get(timeout=30)
        raw.close()
        _say("[demo] also pushed 2 malformed records straight onto the prompts topic")
        _say("[demo] waiting for checkpoints (the student trains as shards land)")
        _say(f"{'step':>6} {'samples':>8} {'shards':>6} {'agreement':>10} {'eval KL':>8}  checkpoint")
        first = last = None
        deadline = time.monotonic() + timeout
        stop = lambda: bool(stack.dead_processes()) or time.monotonic() > deadline  # noqa: E731
        for event in Client(settings=stack.settings()).checkpoints(stop=stop):
            covered = sum(s.record_count for s in event.shards)
            _say(f"{event.step:>6} {event.samples:>8} {len(event.shards):>6} "
                 f"{event.metrics.token_agreement:>10.3f} {event.metrics.eval_kl:>8.3f}  {event.uri}")
            first = first or event
            last = event
            if covered >= unique:
                break
        dead = stack.dead_processes()
        report_path = None
        if last is not None:
            from services.stack.report import dead_letter_counts, write_report

            report_path = write_report(Path(last.uri.removeprefix("file://")),
                                       dead_letters=dead_letter_counts(stack.settings()))
        if last is None or sum(s.record_count for s in last.shards) < unique:
            _say("[demo] FAILED: the student did not train on every prompt")
            for process in dead:
                _say(f"[demo] {process.name} exited; its log ({process.log_path}) ends with:\n{process.log_tail()}")
            return 1
    _say(f"[demo] token agreement with the teacher: {first.metrics.token_agreement:.3f} after the first shard "
         f"-> {last.metrics.token_agreement:.3f} after {len(last.shards)} shards ({last.samples} samples)")
    _say(f"[demo] final checkpoint: {last.uri}")
    if report_path:
        body = json.loads((report_path.parent / "report.json").read_text())
        _say(f"[demo] dead letters by reason: {body.get('dead_letters_by_reason')}")
        _say(f"[demo] training-data report: {report_path}")
    _say(f"[demo] done in {time.monotonic() - started:.0f}s")
    return 0
