"""Student trainer: ShardReady in, streaming KD training, CheckpointReady out.

Shards are trained in the order they arrive on `distill.shards` (one partition). Each shard is
checked (inside the datasets folder, sha256 as announced, teacher vocab/tokenizer = student's),
trained, evaluated, and checkpointed; the checkpoint records every shard it covers, so a restart
resumes from the latest checkpoint and never trains a shard twice. A shard announced again (the
sink re-announces after a crash) is skipped and its checkpoint event re-published.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlparse

from google.protobuf import json_format

from distillery.v1 import checkpoint_pb2, common_pb2, dataset_pb2
from services.common import codec, metrics
from services.common.config import CHECKPOINTS, SHARDS
from services.common.files import same_digest, sha256_file
from services.common.logging import get_logger
from services.common.loop import BaseStage, DeadLetter, Failed, Output
from services.trainer.config import TrainerSettings

log = get_logger(__name__)

SERVICE = "trainer"


def shard_path(uri: str, root: Path) -> Path:
    """The local path of a shard URI, refusing anything outside the datasets folder."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        raise DeadLetter("unsupported-uri", f"shard uri {uri!r}: only local files are supported here")
    path = Path(parsed.path if parsed.scheme else uri)
    root = root.resolve()
    resolved = (root / path).resolve() if not path.is_absolute() else path.resolve()
    if not resolved.is_relative_to(root):
        raise DeadLetter("path-escape", f"shard uri {uri!r} points outside the datasets folder {root}")
    return resolved


def checkpoint_event(checkpoint_dir: Path) -> checkpoint_pb2.CheckpointReady:
    """The CheckpointReady of a saved checkpoint, built from its lineage.json."""
    lineage = json.loads((checkpoint_dir / "lineage.json").read_text())
    metrics_ = lineage.get("metrics", {})
    teacher = lineage.get("teacher", {}) or {}
    student = lineage.get("student", {}) or {}
    event = checkpoint_pb2.CheckpointReady(
        run_id=str(lineage.get("run_id", "")),
        step=int(lineage.get("step", 0)),
        uri=checkpoint_dir.resolve().as_uri(),
        samples=int(lineage.get("samples", 0)),
        lineage_uri=(checkpoint_dir / "lineage.json").resolve().as_uri(),
        metrics=checkpoint_pb2.CheckpointMetrics(
            train_loss=float(metrics_.get("train_loss", 0.0)),
            kd_loss=float(metrics_.get("kd_loss", 0.0)),
            eval_kl=float(metrics_.get("eval_kl", 0.0)),
            token_agreement=float(metrics_.get("token_agreement", 0.0)),
            eval_rows=int(metrics_.get("eval_rows", 0)),
        ),
        teacher=json_format.ParseDict(
            {k: v for k, v in teacher.items() if k in common_pb2.TeacherIdentity.DESCRIPTOR.fields_by_name},
            common_pb2.TeacherIdentity(),
        ),
        student=checkpoint_pb2.StudentIdentity(
            model_name=str(student.get("model_name", student.get("name", ""))),
            parameters=int(student.get("parameters", 0)),
            vocab_size=int(student.get("vocab_size", 0)),
            tokenizer_hash=str(student.get("tokenizer_hash", "")),
        ),
    )
    for shard in lineage.get("shards", []):
        event.shards.add(shard_id=shard["shard_id"], sha256=shard.get("sha256", ""), uri=shard.get("uri", ""),
                         record_count=int(shard.get("record_count", 0)))
    if lineage.get("created_at"):
        event.created_at.FromJsonString(lineage["created_at"])
    return event


class CheckpointBoard:
    """The checkpoints of this run, for the TrainerService (list, watch, status)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.events: list[checkpoint_pb2.CheckpointReady] = []
        self.state = "starting"

    def add(self, event: checkpoint_pb2.CheckpointReady) -> None:
        with self._cond:
            self.events = [e for e in self.events if e.step != event.step] + [event]
            self._cond.notify_all()

    def wait_after(self, count: int, timeout: float) -> list[checkpoint_pb2.CheckpointReady]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.events) > count, timeout)
            return list(self.events[count:])


class TrainerStage(BaseStage):
    name = SERVICE

    def __init__(self, settings: TrainerSettings, trainer, board: CheckpointBoard):
        self.settings = settings
        self.trainer = trainer
        self.board = board
        self.input_topic = settings.topic(SHARDS)
        self.output_topic = settings.topic(CHECKPOINTS)
        self.shards_root = settings.shards_root()
        for path in self.trainer.checkpoints():
            self.board.add(checkpoint_event(path))
        self.board.state = "waiting-for-shards"

    def decode(self, record) -> dataset_pb2.ShardReady:
        shard = codec.decode(record.value, record.headers, dataset_pb2.ShardReady)
        if not shard.shard_id or not shard.uri or not shard.sha256:
            raise DeadLetter("schema-invalid", "ShardReady needs shard_id, uri and sha256")
        return shard

    def process(self, items: Sequence[tuple[object, dataset_pb2.ShardReady]]) -> list[Output | Failed]:
        from services.trainer.data import read_shard
        from services.trainer.losses import VocabMismatchError

        out: list[Output | Failed] = []
        for record, shard in items:
            done = {s["shard_id"] for s in self.trainer.shards_done}
            if shard.shard_id in done:
                log.info("shard_already_trained", shard_id=shard.shard_id, offset=record.offset)
                latest = self.latest_covering(shard.shard_id)
                if latest is not None:
                    out.append(self._output(latest))
                continue
            try:
                path = shard_path(shard.uri, self.shards_root)
                if not path.exists():
                    raise DeadLetter("shard-missing", f"{path} does not exist")
                actual = sha256_file(path)
                if not same_digest(shard.sha256, actual):
                    raise DeadLetter("shard-corrupt", f"{path}: sha256 {actual}, announced {shard.sha256}")
                table = read_shard(path)
                teacher = shard.teachers[0] if shard.teachers else None
                vocab = teacher.vocab_size if teacher else int(table.column("teacher_vocab_size")[0].as_py())
                tok = teacher.tokenizer_hash if teacher else str(table.column("teacher_tokenizer_hash")[0].as_py())
                self.trainer.check_teacher(vocab, tok)
            except DeadLetter as exc:
                out.append(Failed(record, exc.reason, exc.detail))
                continue
            except VocabMismatchError as exc:
                log.error("teacher_student_mismatch", shard_id=shard.shard_id, error=str(exc))
                out.append(Failed(record, "vocab-mismatch", str(exc)))
                continue
            self.board.state = "training"
            stats = self.trainer.train_shard(shard.shard_id, actual, str(path), table)
            if stats is None:
                continue
            for saved in stats.get("checkpoints", []):  # every N steps (DISTILL_CHECKPOINT_EVERY_STEPS)
                event = checkpoint_event(Path(saved))
                self.board.add(event)
                out.append(self._output(event))
            metrics.TRAIN_STEPS.labels(SERVICE).inc(stats.get("steps", 0))
            for part in ("loss", "forward_kl", "reverse_kl", "jsd", "ce"):
                if part in stats:
                    metrics.TRAIN_LOSS.labels(SERVICE, part).set(stats[part])
            evaluation = self.trainer.evaluate()
            if not evaluation["eval_rows"]:  # nothing held out yet: measure on this shard
                evaluation = self.trainer.evaluate(table)
            identity = json_format.MessageToDict(teacher, preserving_proto_field_name=True) if teacher else {}
            checkpoint_metrics = {
                "train_loss": stats.get("loss", 0.0),
                "kd_loss": stats.get("forward_kl", stats.get("kd_loss", 0.0)),
                **evaluation,
            }
            path = self.trainer.save_checkpoint(checkpoint_metrics, identity)
            event = checkpoint_event(Path(path))
            self.board.add(event)
            self.board.state = "waiting-for-shards"
            log.info("checkpoint_ready", shard_id=shard.shard_id, step=event.step, samples=event.samples,
                     token_agreement=round(event.metrics.token_agreement, 4), eval_kl=round(event.metrics.eval_kl, 4),
                     uri=event.uri, offset=record.offset)
            out.append(self._output(event))
        return out

    def latest_covering(self, shard_id: str) -> checkpoint_pb2.CheckpointReady | None:
        for event in reversed(self.board.events):
            if any(s.shard_id == shard_id for s in event.shards):
                return event
        return None

    def _output(self, event: checkpoint_pb2.CheckpointReady) -> Output:
        value, headers = codec.encode(event)
        return Output(self.output_topic, value, key=event.run_id.encode(), headers=headers)


def make_stage(settings: TrainerSettings, board: CheckpointBoard, stack: ExitStack) -> TrainerStage:
    from services.trainer.core import StudentTrainer, TrainConfig

    config = TrainConfig(**{name: getattr(settings, name) for name in TrainConfig.model_fields
                            if name in TrainerSettings.model_fields})
    trainer = StudentTrainer(settings.student_dir, settings.runs_root(), settings.run_id, config)
    return TrainerStage(settings, trainer, board)
