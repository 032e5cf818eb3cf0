"""The gRPC server every service runs: grpc.health.v1 always, plus the service's own API."""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GrpcServer:
    """A gRPC server with the standard health service. `add` registers servicers before start."""

    def __init__(self, port: int, host: str = "0.0.0.0", max_workers: int = 8):
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        self.set_status(NOT_SERVING)

    def add(self, adder: Callable[[object, grpc.Server], None], servicer: object) -> None:
        adder(servicer, self._server)

    def set_status(self, status: int, service: str = "") -> None:
        self.health.set(service, status)

    def start(self) -> None:
        self._server.start()

    def stop(self, grace: float = 5.0) -> None:
        self.health.enter_graceful_shutdown()
        self._server.stop(grace).wait(grace + 1)


def check_health(target: str, timeout: float = 3.0, service: str = "") -> bool:
    """True when the server at target answers SERVING."""
    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return response.status == SERVING


if __name__ == "__main__":  # container healthchecks: python -m services.common.health HOST:PORT
    import sys

    sys.exit(0 if check_health(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051") else 1)
