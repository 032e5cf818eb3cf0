"""The one Kafka wiring: producer and consumer factories with the delivery settings of DESIGN.md s6.

Every service builds its clients here, so security (TLS, SASL), compression, idempotence and the
commit policy are set in exactly one place.
"""

from __future__ import annotations

from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from services.common.config import CommonSettings
from services.common.logging import register_secret


def client_config(settings: CommonSettings) -> dict[str, Any]:
    """Connection settings shared by producers, consumers and admin clients."""
    config: dict[str, Any] = {
        "bootstrap_servers": [s.strip() for s in settings.kafka_bootstrap.split(",") if s.strip()],
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        config["ssl_check_hostname"] = True
        if settings.kafka_ssl_cafile:
            config["ssl_cafile"] = str(settings.kafka_ssl_cafile)
        if settings.kafka_ssl_certfile:
            config["ssl_certfile"] = str(settings.kafka_ssl_certfile)
        if settings.kafka_ssl_keyfile:
            config["ssl_keyfile"] = str(settings.kafka_ssl_keyfile)
    if settings.kafka_security_protocol.startswith("SASL"):
        if not settings.kafka_sasl_mechanism:
            raise ValueError("DISTILL_KAFKA_SASL_MECHANISM is required with a SASL security protocol")
        config["sasl_mechanism"] = settings.kafka_sasl_mechanism
        config["sasl_plain_username"] = settings.kafka_sasl_username
        config["sasl_plain_password"] = (
            settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None
        )
        register_secret(config["sasl_plain_password"])
    return config


def make_producer(settings: CommonSettings, client_id: str, **overrides: Any) -> KafkaProducer:
    """An idempotent producer that waits for all in-sync replicas (acks=all).

    Sends must be checked through their futures (`send(...).get()` or `flush()` then `.get()`):
    a record over `max_request_size` fails only there.
    """
    config = client_config(settings) | {
        "client_id": client_id,
        "acks": "all",
        "enable_idempotence": True,
        "compression_type": None if settings.kafka_compression == "none" else settings.kafka_compression,
        "max_request_size": settings.kafka_max_request_bytes,
        "linger_ms": 5,
        "retries": 2**31 - 1,
        "delivery_timeout_ms": 120_000,
        "request_timeout_ms": 30_000,
    }
    return KafkaProducer(**(config | overrides))


def make_consumer(settings: CommonSettings, group_id: str, client_id: str, **overrides: Any) -> KafkaConsumer:
    """A consumer that never commits on its own: offsets are committed only after the output of
    the records they cover is durable (produced and acknowledged, or fsynced).

    auto_offset_reset=earliest: a new group (a service deployed for the first time) must process
    everything already waiting on its topic, or prompts submitted before it started would be lost.
    isolation_level=read_committed: records of aborted transactions are never processed.
    """
    config = client_config(settings) | {
        "group_id": group_id,
        "client_id": client_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        "max_partition_fetch_bytes": settings.kafka_max_request_bytes,
        "fetch_max_bytes": max(52_428_800, settings.kafka_max_request_bytes),
        "session_timeout_ms": 30_000,
        "heartbeat_interval_ms": 3_000,
        # Generous: a poll loop also waits on Triton calls and training steps; those hand control
        # back to the loop well within this bound (see services/common/loop.py).
        "max_poll_interval_ms": 600_000,
    }
    return KafkaConsumer(**(config | overrides))


def make_admin(settings: CommonSettings, client_id: str = "distill-admin") -> KafkaAdminClient:
    return KafkaAdminClient(**client_config(settings), client_id=client_id)
