"""How every consuming service runs: one function, the same shape for producer-side and
consumer-side services. Signal handlers only set a stop flag; resources close in order through an
ExitStack (consumer, then producer flushes, then the gRPC server)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from contextlib import ExitStack

from services.common.config import DEAD_LETTERS, CommonSettings
from services.common.health import SERVING, GrpcServer
from services.common.kafka import make_consumer, make_producer
from services.common.logging import configure_logging, get_logger
from services.common.loop import Loop, Stage, StopFlag
from services.common.metrics import serve_metrics


def client_id(service: str) -> str:
    return f"distill-{service}-{socket.gethostname()}-{os.getpid()}"


def group_id(service: str) -> str:
    """One consumer group per service: replicas of a service split its partitions."""
    return f"distill-{service}"


def run_consumer_service(
    name: str,
    settings: CommonSettings,
    make_stage: Callable[[ExitStack], Stage],
    grpc_servicers: Callable[[GrpcServer], None] | None = None,
    max_records: int = 64,
    consumer_overrides: dict | None = None,
    stop: StopFlag | None = None,
) -> None:
    configure_logging(name, settings.log_level)
    log = get_logger(__name__, topic_prefix=settings.topic_prefix)
    stop = stop or StopFlag().install()
    serve_metrics(settings.metrics_port)
    with ExitStack() as stack:
        server = GrpcServer.from_settings(settings)
        if grpc_servicers:
            grpc_servicers(server)
        server.start()
        stack.callback(server.stop)
        producer = make_producer(settings, client_id(name))
        stack.callback(producer.close)
        consumer = make_consumer(settings, group_id(name), client_id(name), **(consumer_overrides or {}))
        stack.callback(consumer.close)
        stage = make_stage(stack)
        server.set_status(SERVING)
        log.info("service_started", grpc_port=server.port, metrics_port=settings.metrics_port,
                 bootstrap=settings.kafka_bootstrap, input_topic=stage.input_topic)
        Loop(stage, consumer, producer, settings.topic(DEAD_LETTERS), stop, max_records=max_records,
             commit_interval_s=settings.commit_interval_s).run()
    log.info("service_stopped")
