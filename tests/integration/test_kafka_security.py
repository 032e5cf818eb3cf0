"""TLS and SASL pass through the one Kafka wiring: a real broker with an SSL listener (certificates
made by the test with openssl) and a SASL/PLAIN listener; no secret reaches the logs."""

from __future__ import annotations

import logging
import shutil
import subprocess
import uuid

import pytest

from services.common.config import PROMPTS, CommonSettings
from services.common.kafka import make_consumer, make_producer
from services.stack.kafka import KafkaBroker, create_topics
from services.stack.ports import free_port
from services.stack.processes import wait_for

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make certificates")]

PASSWORD = "s3cr3t-" + uuid.uuid4().hex[:8]


def _certificates(folder):
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=distill-test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "broker.key", "-out", "broker.csr")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "san.ext", "-out", "broker.pem")
    run("pkcs8", "-topk8", "-nocrypt", "-in", "broker.key", "-out", "broker.pk8")
    (folder / "keystore.pem").write_text((folder / "broker.pk8").read_text() + (folder / "broker.pem").read_text())
    return folder / "ca.pem", folder / "keystore.pem"


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    ca, keystore = _certificates(folder)
    broker = KafkaBroker(folder / "kafka")
    ssl_port, sasl_port = free_port(), free_port()
    broker.extra_config = {
        "listeners": f"PLAINTEXT://127.0.0.1:{broker.port},CONTROLLER://127.0.0.1:{broker.controller_port},"
                     f"SSL://127.0.0.1:{ssl_port},SASL_PLAINTEXT://127.0.0.1:{sasl_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{broker.port},SSL://127.0.0.1:{ssl_port},"
                                f"SASL_PLAINTEXT://127.0.0.1:{sasl_port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SSL:SSL,"
                                          "SASL_PLAINTEXT:SASL_PLAINTEXT",
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(keystore),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(ca),
        "sasl.enabled.mechanisms": "PLAIN",
        "listener.name.sasl_plaintext.plain.sasl.jaas.config":
            f'org.apache.kafka.common.security.plain.PlainLoginModule required user_alice="{PASSWORD}";',
    }
    broker.start()
    create_topics(broker.bootstrap, {"sec.prompts": 1})
    yield broker, ca, ssl_port, sasl_port
    broker.stop()


def _round_trip(settings: CommonSettings) -> None:
    producer = make_producer(settings, "t-secure")
    producer.send(settings.topic(PROMPTS), key=b"k", value=b"over a secured listener").get(timeout=30)
    producer.close()
    consumer = make_consumer(settings, f"g-{uuid.uuid4().hex[:6]}", "t-secure")
    consumer.subscribe([settings.topic(PROMPTS)])
    got: list = []

    def received():
        for batch in consumer.poll(timeout_ms=500).values():
            got.extend(batch)
        return any(r.value == b"over a secured listener" for r in got)

    try:
        wait_for(received, timeout=60, what="the record back over the secured listener")
    finally:
        consumer.close()


def test_tls(secure_broker):
    _, ca, ssl_port, _ = secure_broker
    _round_trip(CommonSettings(kafka_bootstrap=f"127.0.0.1:{ssl_port}", topic_prefix="sec.",
                               kafka_security_protocol="SSL", kafka_ssl_cafile=ca))


def test_sasl_plain_and_no_secret_in_logs(secure_broker, capfd):
    from services.common.logging import configure_logging, get_logger

    _, _, _, sasl_port = secure_broker
    settings = CommonSettings(kafka_bootstrap=f"127.0.0.1:{sasl_port}", topic_prefix="sec.",
                              kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN",
                              kafka_sasl_username="alice", kafka_sasl_password=PASSWORD)
    configure_logging("security-test", "DEBUG")  # what a service runs with DISTILL_LOG_LEVEL=DEBUG
    _round_trip(settings)
    get_logger("t").info("a careless line", detail=f"password was {PASSWORD}")
    logging.getLogger("kafka.net.connection").warning("auth_bytes=%s", PASSWORD)
    err = capfd.readouterr().err
    assert "a careless line" in err and "***" in err
    assert PASSWORD not in err
    assert PASSWORD not in repr(settings) and PASSWORD not in settings.model_dump_json()


def test_wrong_password_is_refused(secure_broker):
    from kafka.errors import KafkaError

    _, _, _, sasl_port = secure_broker
    settings = CommonSettings(kafka_bootstrap=f"127.0.0.1:{sasl_port}", topic_prefix="sec.",
                              kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="PLAIN",
                              kafka_sasl_username="alice", kafka_sasl_password="wrong")
    with pytest.raises(KafkaError):
        producer = make_producer(settings, "t-wrong", max_block_ms=5000)
        try:
            producer.send(settings.topic(PROMPTS), value=b"x").get(timeout=10)
        finally:
            producer.close(timeout=1)
