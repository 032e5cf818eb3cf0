"""Dataset sink: TeacherOutput records in, Parquet shards + manifests on disk, ShardReady out.

Rows are buffered per input partition and dedup'd on (prompt id, teacher revision) across
restarts (the writer rebuilds its index from the manifests). A shard closes on size or age, is
written atomically, and only then is ShardReady produced and the offsets it covers committed
(`held()` keeps the loop from committing offsets still sitting in an open buffer).
A shard written but not announced before a crash is announced on the next start.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from datetime import datetime, timezone

from kafka import TopicPartition

from distillery.v1 import teacher_output_pb2
from services.common import codec, metrics
from services.common.config import SHARDS, TEACHER_OUTPUTS
from services.common.dataset import row_from_output
from services.common.logging import get_logger
from services.common.loop import BaseStage, DeadLetter, Failed, Output
from services.sink.config import SinkSettings
from services.sink.shards import ShardWriter

log = get_logger(__name__)

SERVICE = "sink"


class SinkStage(BaseStage):
    name = SERVICE

    def __init__(self, settings: SinkSettings, writer: ShardWriter):
        self.settings = settings
        self.writer = writer
        self.input_topic = settings.topic(TEACHER_OUTPUTS)
        self.output_topic = settings.topic(SHARDS)
        self._to_mark: list[str] = []
        self._startup = list(writer.unannounced())

    def decode(self, record) -> teacher_output_pb2.TeacherOutput:
        output = codec.decode(record.value, record.headers, teacher_output_pb2.TeacherOutput)
        missing = [name for name, value in (
            ("prompt_id", output.prompt_id),
            ("teacher.revision", output.teacher.revision),
            ("teacher.model_name", output.teacher.model_name),
            ("teacher.tokenizer_hash", output.teacher.tokenizer_hash),
            ("lineage.generated_at", output.lineage.HasField("generated_at")),
            ("lineage.received_at", output.lineage.HasField("received_at")),
        ) if not value]
        if missing:
            raise DeadLetter("lineage-missing", f"teacher output lacks {', '.join(missing)}")
        return output

    def process(self, items: Sequence[tuple[object, teacher_output_pb2.TeacherOutput]]) -> list[Output | Failed]:
        out: list[Output | Failed] = []
        now = datetime.now(timezone.utc)
        for record, output in items:
            durable = self.writer.committed_through(record.topic, record.partition)
            if durable is not None and record.offset <= durable:
                metrics.ROWS_DEDUPED.labels(SERVICE).inc()
                continue
            try:
                row = row_from_output(output, record.topic, record.partition, record.offset, now)
                added = self.writer.add(row, record.topic, record.partition, record.offset)
            except ValueError as exc:  # a value the dataset schema cannot hold
                out.append(Failed(record, "schema-invalid", str(exc)))
                continue
            if not added:
                metrics.ROWS_DEDUPED.labels(SERVICE).inc()
        return out

    def _announce(self, shards) -> list[Output]:
        outputs = []
        for shard in shards:
            value, headers = codec.encode(shard.to_proto())
            outputs.append(Output(self.output_topic, value, key=self.settings.dataset.encode(), headers=headers))
            self._to_mark.append(shard.shard_id)
            metrics.SHARDS_WRITTEN.labels(SERVICE).inc()
            log.info("shard_ready", shard_id=shard.shard_id, rows=shard.record_count, bytes=shard.bytes,
                     uri=shard.uri)
        return outputs

    def after_commit(self) -> None:
        """The loop flushed (every ShardReady sent so far is acknowledged) and committed."""
        self._mark()

    def _mark(self) -> None:
        for shard_id in self._to_mark:
            self.writer.mark_announced(shard_id)
        self._to_mark.clear()

    def tick(self) -> list[Output]:
        startup, self._startup = self._startup, []
        return self._announce(startup) + self._announce(self.writer.flush_due())

    def held(self) -> dict[TopicPartition, int]:
        return {TopicPartition(topic, partition): offset for (topic, partition), offset in self.writer.held().items()}

    def on_revoke(self, partitions: Iterable[TopicPartition]) -> list[Output]:
        shards = []
        for tp in partitions:
            shards.extend(self.writer.flush_partition(tp.topic, tp.partition))
        return self._announce(shards)

    def close(self) -> list[Output]:
        return self._announce(self.writer.flush_all())


def make_stage(settings: SinkSettings, stack: ExitStack) -> SinkStage:
    writer = ShardWriter(
        settings.shards_root(),
        settings.dataset,
        writer_id=f"{socket.gethostname()}-{os.getpid()}",
        max_rows=settings.shard_max_rows,
        max_bytes=settings.shard_max_bytes,
        max_age_s=settings.shard_max_age_s,
    )
    return SinkStage(settings, writer)
