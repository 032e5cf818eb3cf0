"""The real broker with the project's one Kafka wiring: keyed, compressed, committed, restartable."""

from __future__ import annotations

import uuid

import pytest
from kafka.errors import MessageSizeTooLargeError

from services.common.config import PROMPTS, CommonSettings
from services.common.kafka import make_consumer, make_producer
from services.stack.kafka import KafkaBroker, create_topics, default_topics
from services.stack.processes import wait_for

pytestmark = pytest.mark.integration


def _consume(settings: CommonSettings, group: str, want: int, commit: bool = True) -> list:
    consumer = make_consumer(settings, group, f"t-{uuid.uuid4().hex[:6]}")
    consumer.subscribe([settings.topic(PROMPTS)])
    got: list = []

    def enough():
        for records in consumer.poll(timeout_ms=500).values():
            got.extend(records)
        return len(got) >= want

    try:
        wait_for(enough, timeout=60, what=f"{want} records")
        if commit:
            consumer.commit()
    finally:
        consumer.close()
    return got


def test_produce_and_consume_with_project_wiring(kafka_settings):
    producer = make_producer(kafka_settings, "t-producer")
    futures = [
        producer.send(kafka_settings.topic(PROMPTS), key=f"k{i}".encode(), value=f"v{i}".encode() * 50,
                      headers=[("content-type", b"application/json")])
        for i in range(40)
    ]
    producer.flush()
    metadata = [f.get(timeout=10) for f in futures]
    assert {m.partition for m in metadata} <= set(range(4))
    producer.close()

    records = _consume(kafka_settings, "g1", 40)
    assert sorted(r.key for r in records) == sorted(f"k{i}".encode() for i in range(40))
    assert all(r.value == r.key.replace(b"k", b"v") * 50 for r in records)
    assert all(dict(r.headers)["content-type"] == b"application/json" for r in records)

    # committed offsets survive: a new consumer in the same group gets only what came after
    producer = make_producer(kafka_settings, "t-producer-2")
    producer.send(kafka_settings.topic(PROMPTS), key=b"late", value=b"late").get(timeout=10)
    producer.close()
    again = _consume(kafka_settings, "g1", 1)
    assert [r.key for r in again] == [b"late"]


def test_oversized_record_fails_through_its_future(kafka_settings):
    settings = kafka_settings.model_copy(update={"kafka_max_request_bytes": 10_000})
    producer = make_producer(settings, "t-big", compression_type=None)
    with pytest.raises(MessageSizeTooLargeError):
        producer.send(settings.topic(PROMPTS), value=b"x" * 20_000).get(timeout=10)
    producer.close()


def test_broker_restart_keeps_data(tmp_path):
    broker = KafkaBroker(tmp_path / "kafka")
    broker.start()
    try:
        create_topics(broker.bootstrap, default_topics("r."))
        settings = CommonSettings(kafka_bootstrap=broker.bootstrap, topic_prefix="r.")
        producer = make_producer(settings, "t-restart")
        producer.send(settings.topic(PROMPTS), key=b"a", value=b"before restart").get(timeout=10)
        producer.close()
        broker.stop()
        assert not broker.running
        broker.start()
        records = _consume(settings, "g-restart", 1)
        assert [r.value for r in records] == [b"before restart"]
    finally:
        broker.stop()
