"""The one Kafka loop every consuming service runs: poll, decode, process, produce, commit after
the output is durable, dead-letter what cannot be handled, stop on a flag, flush.

A service supplies a `Stage` (its logic, no Kafka in it) and calls `run_loop`. Error policy:
- a record that cannot be decoded or processed (`DeadLetter`, `DecodeError`): sent to the
  dead-letter topic with the reason, stage and source coordinates in headers; the loop moves on.
- a temporary failure (`Retry`, e.g. Triton unreachable): the batch is rewound (seek back to its
  first offsets) and retried with exponential backoff; nothing is skipped, nothing committed.
- anything else: logged with topic/partition/offset and re-raised: the process stops and its
  supervisor restarts it; uncommitted records are consumed again.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError, MessageSizeTooLargeError

from services.common import metrics
from services.common.codec import DecodeError, Headers
from services.common.logging import get_logger

log = get_logger(__name__)

DETAIL_LIMIT = 2_000


class DeadLetter(Exception):
    """This record cannot be handled, now or later. `reason` is a short tag for metrics and ops."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Retry(Exception):
    """A temporary failure of a dependency: rewind the batch and try again after a backoff."""


@dataclass
class Output:
    """A record to produce. `source` is the input record it answers (for dead-lettering it when
    the output cannot be sent, e.g. too large)."""

    topic: str
    value: bytes
    key: bytes | None = None
    headers: Headers = field(default_factory=list)
    source: ConsumerRecord | None = None


@dataclass
class Failed:
    """A record the stage could not handle, to be dead-lettered."""

    record: ConsumerRecord
    reason: str
    detail: str = ""


class Stage(Protocol):
    name: str
    input_topic: str

    def decode(self, record: ConsumerRecord) -> Any:
        """Turn a record into the stage's input; raise DecodeError or DeadLetter when impossible."""

    def process(self, items: Sequence[tuple[ConsumerRecord, Any]]) -> list[Output | Failed]:
        """Handle decoded records; raise Retry for a temporary failure of the whole batch."""

    def tick(self) -> list[Output]:
        """Time-based work (close an old shard, ...), called on every loop turn."""

    def held(self) -> dict[TopicPartition, int]:
        """Lowest offset per partition whose output is not durable yet (buffered in an open shard,
        not covered by a checkpoint). Offsets at or after it are not committed."""

    def on_revoke(self, partitions: Iterable[TopicPartition]) -> list[Output]:
        """Partitions are leaving this consumer: make what is held durable, or drop it."""

    def close(self) -> list[Output]:
        """Stopping: make what is held durable where possible."""

    def after_commit(self) -> None:
        """Every output sent so far is acknowledged and the offsets are committed."""


class BaseStage:
    """Defaults for a stage that holds nothing back: every output is produced in `process`."""

    def tick(self) -> list[Output]:
        return []

    def held(self) -> dict[TopicPartition, int]:
        return {}

    def on_revoke(self, partitions: Iterable[TopicPartition]) -> list[Output]:
        return []

    def close(self) -> list[Output]:
        return []

    def after_commit(self) -> None:
        pass


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop ends its turn, commits, flushes and returns."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self, *_: object) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        return self._event.wait(seconds)

    def install(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.set)
        return self


def dead_letter_headers(record: ConsumerRecord, stage: str, reason: str, detail: str) -> Headers:
    original = [(k, v) for k, v in (record.headers or []) if not k.startswith("dlq-")]
    return original + [
        ("dlq-reason", reason.encode()),
        ("dlq-detail", detail[:DETAIL_LIMIT].encode("utf-8", "replace")),
        ("dlq-stage", stage.encode()),
        ("dlq-source-topic", record.topic.encode()),
        ("dlq-source-partition", str(record.partition).encode()),
        ("dlq-source-offset", str(record.offset).encode()),
        ("dlq-time", str(int(time.time() * 1000)).encode()),
    ]


class Loop:
    def __init__(
        self,
        stage: Stage,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        dead_letter_topic: str,
        stop: StopFlag,
        max_records: int = 64,
        poll_timeout_ms: int = 200,
        max_backoff_s: float = 30.0,
        commit_interval_s: float = 0.5,
    ):
        self.stage = stage
        self.consumer = consumer
        self.producer = producer
        self.dead_letter_topic = dead_letter_topic
        self.stop = stop
        self.max_records = max_records
        self.poll_timeout_ms = poll_timeout_ms
        self.max_backoff_s = max_backoff_s
        # Outputs are sent asynchronously; every `commit_interval_s` the loop waits for their
        # acknowledgements and commits. A crash re-processes at most that much (at-least-once).
        self.commit_interval_s = commit_interval_s
        self._last_commit = time.monotonic()
        self.log = log.bind(stage=stage.name, topic=stage.input_topic)
        # next offset to commit per partition: one past the last record processed
        self._processed: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._pending: list[tuple[Any, Output | None, ConsumerRecord | None]] = []

    # -- producing ---------------------------------------------------------------------------
    def _send(self, output: Output) -> None:
        try:
            future = self.producer.send(output.topic, value=output.value, key=output.key, headers=output.headers)
        except MessageSizeTooLargeError as exc:
            if output.source is None:
                raise
            self.dead_letter(output.source, "output-too-large", str(exc))
            return
        self._pending.append((future, output, output.source))
        metrics.RECORDS_OUT.labels(self.stage.name, output.topic).inc()

    def dead_letter(self, record: ConsumerRecord, reason: str, detail: str = "") -> None:
        self.log.warning(
            "dead_letter",
            partition=record.partition,
            offset=record.offset,
            key=record.key.decode("utf-8", "replace") if record.key else None,
            reason=reason,
            detail=detail[:500],
        )
        metrics.DEAD_LETTERS.labels(self.stage.name, reason).inc()
        future = self.producer.send(
            self.dead_letter_topic,
            value=record.value,
            key=record.key,
            headers=dead_letter_headers(record, self.stage.name, reason, detail),
        )
        self._pending.append((future, None, record))

    def _emit(self, results: Iterable[Output | Failed]) -> None:
        for result in results:
            if isinstance(result, Failed):
                self.dead_letter(result.record, result.reason, result.detail)
            else:
                self._send(result)

    def flush(self) -> None:
        """Wait until every produced record is acknowledged; dead-letter inputs whose output was
        refused as too large; raise on any other delivery failure (nothing gets committed)."""
        if not self._pending:
            return
        self.producer.flush()
        pending, self._pending = self._pending, []
        for future, output, source in pending:
            try:
                future.get(timeout=0)
            except MessageSizeTooLargeError as exc:
                if output is None or source is None:
                    raise
                self.dead_letter(source, "output-too-large", str(exc))
            except KafkaError:
                raise
        if self._pending:  # dead letters added above
            self.flush()

    # -- committing --------------------------------------------------------------------------
    def commit(self) -> None:
        """Flush every pending send, then commit what is durable; tell the stage afterwards."""
        self.flush()
        self._last_commit = time.monotonic()
        self._commit_offsets()
        self.stage.after_commit()

    def _commit_offsets(self) -> None:
        held = self.stage.held()
        offsets: dict[TopicPartition, int] = {}
        for tp, next_offset in self._processed.items():
            target = min(next_offset, held[tp]) if tp in held else next_offset
            if self._committed.get(tp, -1) < target:
                offsets[tp] = target
        if not offsets:
            return
        from kafka.structs import OffsetAndMetadata

        self.consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
        self._committed.update(offsets)
        self.log.debug("committed", offsets={f"{tp.topic}:{tp.partition}": o for tp, o in offsets.items()})

    # -- rebalance ---------------------------------------------------------------------------
    def listener(self) -> ConsumerRebalanceListener:
        loop = self

        class _Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked):
                revoked = list(revoked)
                if not revoked:
                    return
                loop.log.info("partitions_revoked", partitions=[tp.partition for tp in revoked])
                loop._emit(loop.stage.on_revoke(revoked))
                loop.commit()
                for tp in revoked:
                    loop._processed.pop(tp, None)
                    loop._committed.pop(tp, None)

            def on_partitions_assigned(self, assigned):
                loop.log.info("partitions_assigned", partitions=sorted(tp.partition for tp in assigned))

        return _Listener()

    # -- the loop ----------------------------------------------------------------------------
    def _rewind(self, batch: Sequence[ConsumerRecord]) -> None:
        first: dict[TopicPartition, int] = {}
        for record in batch:
            tp = TopicPartition(record.topic, record.partition)
            first[tp] = min(first.get(tp, record.offset), record.offset)
        for tp, offset in first.items():
            if tp in self.consumer.assignment():
                self.consumer.seek(tp, offset)

    def _update_lag(self) -> None:
        for tp in self.consumer.assignment():
            end = self.consumer.highwater(tp)
            position = self._processed.get(tp)
            if end is not None and position is not None:
                metrics.CONSUMER_LAG.labels(self.stage.name, tp.topic, str(tp.partition)).set(max(0, end - position))

    def run_once(self) -> int:
        """One turn: poll, process, produce, commit. Returns the number of records handled."""
        polled = self.consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=self.max_records)
        batch = [record for records in polled.values() for record in records]
        if batch:
            self._handle(batch)
        self._emit(self.stage.tick())
        if time.monotonic() - self._last_commit >= self.commit_interval_s or not batch:
            self.commit()
        self._update_lag()
        return len(batch)

    def _handle(self, batch: list[ConsumerRecord]) -> None:
        metrics.RECORDS_IN.labels(self.stage.name, self.stage.input_topic).inc(len(batch))
        items = []
        for record in batch:
            try:
                items.append((record, self.stage.decode(record)))
            except (DecodeError, DeadLetter) as exc:
                self.dead_letter(record, exc.reason, exc.detail)
        backoff = 0.5
        started = time.monotonic()
        while True:
            try:
                results = self.stage.process(items) if items else []
                break
            except Retry as exc:
                metrics.RETRIES.labels(self.stage.name).inc()
                self.log.warning("retry_batch", error=str(exc), records=len(items), backoff_s=backoff)
                if self.stop.wait(backoff):
                    # stopping: give the batch back untouched; it is consumed again after restart
                    self._rewind([r for r, _ in items])
                    self.flush()
                    return
                backoff = min(backoff * 2, self.max_backoff_s)
                # keep group membership alive while the dependency is down: poll with every
                # partition paused (returns nothing) so the consumer stays in its group
                assigned = list(self.consumer.assignment())
                self.consumer.pause(*assigned)
                self.consumer.poll(timeout_ms=0)
                self.consumer.resume(*assigned)
        self._emit(results)
        for record in batch:
            tp = TopicPartition(record.topic, record.partition)
            self._processed[tp] = max(self._processed.get(tp, 0), record.offset + 1)
        metrics.PROCESS_SECONDS.labels(self.stage.name).observe(time.monotonic() - started)

    def run(self) -> None:
        self.consumer.subscribe([self.stage.input_topic], listener=self.listener())
        self.log.info("loop_started")
        try:
            while not self.stop.is_set():
                self.run_once()
        finally:
            self.log.info("loop_stopping")
            try:
                self._emit(self.stage.close())
                self.commit()
            finally:
                self.producer.flush()
        self.log.info("loop_stopped")
