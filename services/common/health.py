"""The gRPC server every service runs: grpc.health.v1 always, plus the service's own API."""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GrpcServer:
    """A gRPC server with the standard health service. `add` registers servicers before start."""

    def __init__(self, port: int, host: str = "0.0.0.0", max_workers: int = 8,
                 tls_certfile: Path | None = None, tls_keyfile: Path | None = None):
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if tls_certfile and tls_keyfile:
            credentials = grpc.ssl_server_credentials(
                [(Path(tls_keyfile).read_bytes(), Path(tls_certfile).read_bytes())])
            self.port = self._server.add_secure_port(f"{host}:{port}", credentials)
        elif tls_certfile or tls_keyfile:
            raise ValueError("gRPC TLS needs both DISTILL_GRPC_TLS_CERTFILE and DISTILL_GRPC_TLS_KEYFILE")
        else:
            self.port = self._server.add_insecure_port(f"{host}:{port}")
        self.set_status(NOT_SERVING)

    @classmethod
    def from_settings(cls, settings) -> "GrpcServer":
        """The service's server as its settings say: port, and TLS when a certificate is configured."""
        return cls(settings.grpc_port, tls_certfile=settings.grpc_tls_certfile, tls_keyfile=settings.grpc_tls_keyfile)

    def add(self, adder: Callable[[object, grpc.Server], None], servicer: object) -> None:
        adder(servicer, self._server)

    def set_status(self, status: int, service: str = "") -> None:
        self.health.set(service, status)

    def start(self) -> None:
        self._server.start()

    def stop(self, grace: float = 5.0) -> None:
        self.health.enter_graceful_shutdown()
        self._server.stop(grace).wait(grace + 1)


def check_health(target: str, timeout: float = 3.0, service: str = "", tls_cafile: Path | None = None) -> bool:
    """True when the server at target answers SERVING (over TLS when a CA file is given)."""
    channel = (grpc.secure_channel(target, grpc.ssl_channel_credentials(Path(tls_cafile).read_bytes()))
               if tls_cafile else grpc.insecure_channel(target))
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return response.status == SERVING


if __name__ == "__main__":  # container healthchecks: python -m services.common.health HOST:PORT
    import sys

    from services.common.config import CommonSettings

    ca = CommonSettings().grpc_tls_cafile  # the one config loader: DISTILL_GRPC_TLS_CAFILE
    sys.exit(0 if check_health(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051", tls_cafile=ca) else 1)
