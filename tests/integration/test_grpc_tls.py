"""gRPC servers take TLS certificates when configured; health answers over TLS only."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from services.common.config import CommonSettings
from services.common.health import SERVING, GrpcServer, check_health

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make certificates")


def test_grpc_server_with_tls(tmp_path):
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", "server.key", "-out", "server.pem"], check=True, capture_output=True, cwd=tmp_path)
    settings = CommonSettings(grpc_port=0, grpc_tls_certfile=tmp_path / "server.pem",
                              grpc_tls_keyfile=tmp_path / "server.key")
    server = GrpcServer.from_settings(settings)
    server.start()
    server.set_status(SERVING)
    try:
        target = f"127.0.0.1:{server.port}"
        assert check_health(target, tls_cafile=tmp_path / "server.pem")
        assert not check_health(target, timeout=2), "a plaintext client is refused"
    finally:
        server.stop(0)
    with pytest.raises(ValueError, match="needs both"):
        GrpcServer(0, tls_certfile=tmp_path / "server.pem")
