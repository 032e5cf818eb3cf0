"""The real broker (started by services/stack/kafka.py) with the project's one Kafka wiring
(services/common/kafka.py): keyed zstd records, read_committed consumers with manual commits,
oversized records failing through their future, and a broker that restarts with its data."""

from __future__ import annotations

import os
import socket
import stat
import uuid
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, TopicPartition
from kafka.errors import MessageSizeTooLargeError

from services.common.config import CHECKPOINTS, DEAD_LETTERS, PROMPTS, SHARDS, TEACHER_OUTPUTS, CommonSettings
from services.common.kafka import make_consumer, make_producer
from services.stack import kafka as kafka_stack
from services.stack.errors import LaunchError
from services.stack.kafka import KafkaBroker, create_topics, default_topics, ensure_jars
from services.stack.processes import wait_for

pytestmark = pytest.mark.integration

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _drain(settings: CommonSettings, group: str, topic: str, commit: bool, timeout: float = 60) -> list:
    """Everything `group` has not consumed yet on `topic`: polls until the consumer's position
    has reached the end of every partition, then commits (if asked) and closes."""
    consumer = make_consumer(settings, group, f"t-{uuid.uuid4().hex[:6]}")
    consumer.subscribe([topic])
    records: list = []

    def caught_up() -> bool:
        for batch in consumer.poll(timeout_ms=300).values():
            records.extend(batch)
        assigned = consumer.assignment()
        if not assigned:
            return False
        ends = consumer.end_offsets(list(assigned))
        return all(consumer.position(tp) >= ends[tp] for tp in assigned)

    try:
        wait_for(caught_up, timeout=timeout, what=f"group {group} to reach the end of {topic}")
        if commit:
            consumer.commit()
    finally:
        consumer.close()
    return records


def _committed(bootstrap: str, group: str) -> dict[TopicPartition, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="t-offsets")
    try:
        return {tp: meta.offset for tp, meta in admin.list_group_offsets({group: None})[group].items()}
    finally:
        admin.close()


def _send_all(producer, topic: str, records: list[tuple[bytes, bytes]], headers: list) -> dict[bytes, object]:
    futures = {key: producer.send(topic, key=key, value=value, headers=headers) for key, value in records}
    producer.flush()
    return {key: future.get(timeout=30) for key, future in futures.items()}


# -- topics --------------------------------------------------------------------------------------


def test_default_topics_layout():
    topics = default_topics("x.", partitions=6)
    assert topics == {"x.prompts": 6, "x.teacher-outputs": 6, "x.shards": 1, "x.checkpoints": 1,
                      "x.dead-letters": 1}
    assert set(default_topics()) == {f"distill.{t}" for t in (PROMPTS, TEACHER_OUTPUTS, SHARDS, CHECKPOINTS,
                                                               DEAD_LETTERS)}


def test_create_topics_is_idempotent_and_sets_partitions(kafka_broker):
    prefix = f"c{uuid.uuid4().hex[:8]}."
    topics = default_topics(prefix, partitions=3)
    create_topics(kafka_broker.bootstrap, topics, configs={"retention.ms": "3600000"})
    create_topics(kafka_broker.bootstrap, topics)  # again: no error, nothing changes
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap, client_id="t-topics")
    try:
        described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(list(topics))}
    finally:
        admin.close()
    assert described == topics


# -- the project's wiring against the real broker ------------------------------------------------


def test_keyed_zstd_records_round_trip_and_commits_survive(kafka_settings, kafka_broker):
    assert kafka_settings.kafka_compression == "zstd"
    topic = kafka_settings.topic(PROMPTS)
    headers = [("content-type", b"application/x-protobuf"), ("schema", b"distillery.v1.Prompt")]
    sent = [(f"prompt-{i}".encode(), f"value {i} ".encode() * 40) for i in range(60)]

    producer = make_producer(kafka_settings, "t-producer")
    try:
        metadata = _send_all(producer, topic, sent, headers)
    finally:
        producer.close()
    assert {m.partition for m in metadata.values()} == {0, 1, 2, 3}  # keys spread over all partitions

    records = _drain(kafka_settings, "g-round-trip", topic, commit=True)
    assert sorted((r.key, r.value) for r in records) == sorted(sent)
    for r in records:
        assert r.headers == headers
        assert (r.partition, r.offset) == (metadata[r.key].partition, metadata[r.key].offset)

    # The batches went over the wire and into the log zstd-compressed.
    if isinstance(kafka_broker, KafkaBroker):
        segments = list((kafka_broker.data_dir / "data").glob(f"{topic}-*/*.log"))
        assert segments and any(ZSTD_MAGIC in seg.read_bytes() for seg in segments)

    # The commit is stored by the broker: every partition's committed offset is its end.
    committed = _committed(kafka_settings.kafka_bootstrap, "g-round-trip")
    assert sum(committed.values()) == len(sent)

    # A new consumer in the same group gets only what came after the commit.
    producer = make_producer(kafka_settings, "t-producer-late")
    try:
        _send_all(producer, topic, [(b"late", b"after the commit")], headers)
    finally:
        producer.close()
    again = _drain(kafka_settings, "g-round-trip", topic, commit=False)
    assert [(r.key, r.value) for r in again] == [(b"late", b"after the commit")]

    # Not committed this time: the next consumer in the group sees the record again.
    assert [r.key for r in _drain(kafka_settings, "g-round-trip", topic, commit=True)] == [b"late"]


def test_record_over_the_client_limit_is_refused_at_send(kafka_settings):
    """kafka-python 3.0.12 checks `max_request_size` (our kafka_max_request_bytes) inside
    send() and raises there; the record never reaches the broker."""
    settings = kafka_settings.model_copy(update={"kafka_max_request_bytes": 10_000})
    producer = make_producer(settings, "t-big")
    try:
        with pytest.raises(MessageSizeTooLargeError):
            producer.send(settings.topic(PROMPTS), key=b"big", value=os.urandom(20_000)).get(timeout=30)
        # The producer is still usable for records within the limit.
        assert producer.send(settings.topic(PROMPTS), key=b"small", value=b"ok").get(timeout=30).offset >= 0
    finally:
        producer.close()


def test_record_over_the_broker_limit_fails_through_its_future(kafka_settings):
    """Within the client's limit but over the topic's max.message.bytes: send() returns, and the
    broker's MESSAGE_TOO_LARGE arrives through the future (the only place it shows).

    kafka-python 3.0.12 treats that error as fatal for an idempotent producer: every later send
    of the same producer fails with it too, so such a producer must be closed and replaced. The
    project avoids the case by keeping kafka_max_request_bytes (8 MiB) under the broker's
    message.max.bytes (16 MiB), so the client-side check above fires first.
    """
    topic = f"{kafka_settings.topic_prefix}small-records"
    create_topics(kafka_settings.kafka_bootstrap, {topic: 1}, configs={"max.message.bytes": "10000"})
    producer = make_producer(kafka_settings, "t-big-broker")
    try:
        future = producer.send(topic, key=b"big", value=os.urandom(20_000))  # random: zstd cannot shrink it
        with pytest.raises(MessageSizeTooLargeError):
            future.get(timeout=60)
    finally:
        producer.close()
    producer = make_producer(kafka_settings, "t-big-broker-2")
    try:
        assert producer.send(topic, key=b"small", value=b"ok").get(timeout=30).offset == 0  # nothing was written
    finally:
        producer.close()


# -- the launcher --------------------------------------------------------------------------------


def test_broker_restarts_with_its_data_offsets_and_address(tmp_path):
    broker = KafkaBroker(tmp_path / "kafka", heap="512m")
    try:
        broker.start()
        bootstrap, cluster_id = broker.bootstrap, broker.cluster_id
        create_topics(broker.bootstrap, default_topics("r."))
        settings = CommonSettings(kafka_bootstrap=broker.bootstrap, topic_prefix="r.", data_dir=tmp_path)
        topic = settings.topic(SHARDS)
        producer = make_producer(settings, "t-restart")
        producer.send(topic, key=b"a", value=b"before restart").get(timeout=30)
        producer.close()
        assert [r.value for r in _drain(settings, "g-restart", topic, commit=True)] == [b"before restart"]

        broker.stop()
        assert not broker.running
        broker.start()  # same data dir, same ports, not formatted again
        assert (broker.bootstrap, broker.cluster_id) == (bootstrap, cluster_id)
        producer = make_producer(settings, "t-restart-2")
        producer.send(topic, key=b"b", value=b"after restart").get(timeout=30)
        producer.close()
        # The group's commit survived: it gets only the new record ...
        assert [r.value for r in _drain(settings, "g-restart", topic, commit=True)] == [b"after restart"]
        # ... and the data survived: a new group gets both.
        assert [r.value for r in _drain(settings, "g-fresh-1", topic, commit=False)] == [
            b"before restart", b"after restart"]

        broker.kill()  # no controlled shutdown, as in the chaos tests
        assert not broker.running
        broker.start()
        assert [r.value for r in _drain(settings, "g-fresh-2", topic, commit=False)] == [
            b"before restart", b"after restart"]
    finally:
        broker.stop()
    assert not broker.running
    assert "Kafka Server started" in broker.log_path.read_text()


def test_start_fails_fast_when_the_port_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        broker = KafkaBroker(tmp_path / "kafka", port=taken.getsockname()[1])
        with pytest.raises(LaunchError, match="is taken"):
            broker.start()
    assert not broker.running


def _fake_mvn(bin_dir: Path, script: str) -> None:
    bin_dir.mkdir()
    mvn = bin_dir / "mvn"
    mvn.write_text("#!/bin/sh\n" + script)
    mvn.chmod(mvn.stat().st_mode | stat.S_IXUSR)


def test_ensure_jars_reports_maven_failure(tmp_path, monkeypatch):
    _fake_mvn(tmp_path / "bin", 'echo "[ERROR] Could not resolve dependencies for project" >&2\nexit 1\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    libs = tmp_path / "cache" / "libs"
    with pytest.raises(LaunchError, match="Could not resolve dependencies"):
        ensure_jars(libs)
    assert not libs.exists()  # nothing half-done left in place
    assert not [p for p in libs.parent.iterdir() if ".tmp-" in p.name]


def test_ensure_jars_is_idempotent(tmp_path, monkeypatch):
    # A fake mvn that "copies" one jar and counts its calls.
    calls = tmp_path / "calls"
    _fake_mvn(tmp_path / "bin", f'echo x >> {calls}\n'
              'for a in "$@"; do case "$a" in -DoutputDirectory=*) out="${a#-DoutputDirectory=}";; esac; done\n'
              f'touch "$out/kafka_2.13-{kafka_stack.KAFKA_VERSION}.jar"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    libs = tmp_path / "cache" / "libs"
    assert ensure_jars(libs) == libs
    assert ensure_jars(libs) == libs
    assert (libs / f"kafka_2.13-{kafka_stack.KAFKA_VERSION}.jar").exists()
    assert calls.read_text().count("x") == 1
    # A marker from another pom makes it fetch again.
    (libs / kafka_stack.MARKER).write_text("0" * 64)
    ensure_jars(libs)
    assert calls.read_text().count("x") == 2
