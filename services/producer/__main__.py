"""`distill run producer`: the gRPC PromptService (and health) in front of distill.prompts."""

from __future__ import annotations

from contextlib import ExitStack

from distillery.v1 import services_pb2_grpc
from services.common.config import load
from services.common.health import SERVING, GrpcServer
from services.common.kafka import make_producer
from services.common.logging import configure_logging, get_logger
from services.common.loop import StopFlag
from services.common.metrics import serve_metrics
from services.common.service import client_id
from services.producer.config import ProducerSettings
from services.producer.server import PromptService
from services.producer.submit import SERVICE, PromptSubmitter


def main(settings: ProducerSettings | None = None, stop: StopFlag | None = None) -> None:
    settings = settings or load(ProducerSettings)
    configure_logging(SERVICE, settings.log_level)
    log = get_logger(__name__)
    stop = stop or StopFlag().install()
    serve_metrics(settings.metrics_port)
    with ExitStack() as stack:
        producer = make_producer(settings, client_id(SERVICE))
        stack.callback(producer.close)
        server = GrpcServer.from_settings(settings)
        server.add(services_pb2_grpc.add_PromptServiceServicer_to_server,
                   PromptService(PromptSubmitter(settings, producer, settings.submit_chunk)))
        server.start()
        stack.callback(server.stop)
        server.set_status(SERVING)
        log.info("service_started", grpc_port=server.port, metrics_port=settings.metrics_port,
                 topic=settings.topic("prompts"))
        while not stop.wait(1.0):
            pass
    log.info("service_stopped")


if __name__ == "__main__":
    main()
