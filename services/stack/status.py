"""`distill status`: lag per stage (from the consumer groups' committed offsets against the
partition ends), records waiting, and the latest checkpoint event."""

from __future__ import annotations

import time

from kafka import TopicPartition

from distillery.v1 import checkpoint_pb2
from services.common import codec
from services.common.config import CHECKPOINTS, DEAD_LETTERS, PROMPTS, SHARDS, TEACHER_OUTPUTS, CommonSettings
from services.common.kafka import make_admin, make_consumer
from services.common.service import group_id

STAGES = (("teacher", PROMPTS), ("sink", TEACHER_OUTPUTS), ("trainer", SHARDS))


def _ends(consumer, topic: str) -> dict[TopicPartition, int]:
    partitions = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    return consumer.end_offsets(tps) if tps else {}


def _committed(admin, service: str) -> dict[TopicPartition, int]:
    offsets = admin.list_consumer_group_offsets(group_id(service))
    return {tp: (o.offset if o.offset >= 0 else 0) for tp, o in offsets.items()}


def stack_status(settings: CommonSettings, window_s: float = 2.0) -> dict:
    """Lag per stage, and records/s from committed offsets sampled `window_s` apart."""
    admin = make_admin(settings, "distill-status")
    consumer = make_consumer(settings, "distill-status", "distill-status")
    try:
        body: dict = {"kafka": settings.kafka_bootstrap, "stages": {}}
        first = {service: _committed(admin, service) for service, _ in STAGES}
        started = time.monotonic()
        time.sleep(window_s)
        for service, topic_name in STAGES:
            topic = settings.topic(topic_name)
            ends = _ends(consumer, topic)
            committed = _committed(admin, service)
            elapsed = time.monotonic() - started
            lag = {str(tp.partition): end - committed.get(tp, 0) for tp, end in ends.items()}
            done = sum(committed.get(tp, 0) - first[service].get(tp, 0) for tp in ends)
            body["stages"][service] = {
                "topic": topic,
                "records": sum(ends.values()),
                "lag": sum(lag.values()),
                "lag_by_partition": lag,
                "records_per_s": round(done / elapsed, 2),
            }
        for name in (CHECKPOINTS, DEAD_LETTERS):
            body[f"{name}_total"] = sum(_ends(consumer, settings.topic(name)).values())
        body["latest_checkpoint"] = latest_checkpoint(consumer, settings)
        return body
    finally:
        consumer.close()
        admin.close()


def latest_checkpoint(consumer, settings: CommonSettings) -> dict | None:
    from google.protobuf import json_format

    ends = _ends(consumer, settings.topic(CHECKPOINTS))
    latest = None
    for tp, end in ends.items():
        if end == 0:
            continue
        consumer.assign([tp])
        consumer.seek(tp, end - 1)
        for records in consumer.poll(timeout_ms=5000).values():
            for record in records:
                message = codec.decode(record.value, record.headers, checkpoint_pb2.CheckpointReady)
                if latest is None or message.created_at.ToMilliseconds() > latest.created_at.ToMilliseconds():
                    latest = message
    return json_format.MessageToDict(latest, preserving_proto_field_name=True) if latest else None
