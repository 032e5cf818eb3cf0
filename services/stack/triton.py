"""The local Triton Inference Server: the real `tritonserver` binary shipped in the nvidia-pytriton
wheel, serving deploy/triton/model_repository (the same repository docker-compose mounts into the
official image).

Machine facts (DESIGN.md s9): the python backend and the stub for this interpreter's version are
copied into .cache/triton/backends/python; LD_LIBRARY_PATH puts this interpreter's LIBDIR first (or
the stub loads the system's older libpython and model load fails with "'_thread.RLock' object has
no attribute '_recursion_count'") plus the wheel's bundled libraries; PYTHONPATH gives model.py the
virtualenv's site-packages and the repository. NVML/DCGM errors on a CPU host are harmless.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from services.common.logging import get_logger
from services.stack.errors import LaunchError
from services.stack.ports import free_port, port_is_free

log = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = REPO_ROOT / "deploy" / "triton" / "model_repository"
CACHE = REPO_ROOT / ".cache" / "triton"
# Lines of Triton's log that explain a failed model load.
_ERROR_LINE = re.compile(r"^E\d{4}|error|failed|Traceback|Exception|UNAVAILABLE", re.IGNORECASE)
_HARMLESS = re.compile(r"nvml|dcgm|cuda|gpu|metrics", re.IGNORECASE)


def _pytriton_root() -> Path:
    import pytriton

    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def ensure_backend(cache: Path = CACHE) -> Path:
    """The backends folder to pass as --backend-directory: the python backend with this
    interpreter's stub beside it (copied once)."""
    root = _pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise LaunchError(f"nvidia-pytriton ships no python backend stub for Python {version} ({stub})")
    target = cache / "backends" / "python"
    marker = target / f".complete-{version}"
    if not marker.exists():
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(root / "backends" / "python", target, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, target / "triton_python_backend_stub")
        marker.touch()
    return target.parent


def server_env(teacher_model_dir: Path | None = None, extra: dict | None = None) -> dict[str, str]:
    import pytriton

    site = Path(pytriton.__file__).resolve().parents[1]
    libs = site / "nvidia_pytriton.libs"
    env = os.environ.copy()
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        filter(None, [sysconfig.get_config_var("LIBDIR"), str(libs), env.get("LD_LIBRARY_PATH")]))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), str(REPO_ROOT), env.get("PYTHONPATH")]))
    if teacher_model_dir is not None:
        env["DISTILL_TEACHER_MODEL_DIR"] = str(Path(teacher_model_dir).resolve())
    return env | (extra or {})


class TritonServer:
    def __init__(self, model_repository: Path = MODEL_REPOSITORY, data_dir: Path = Path(".distill/triton"),
                 teacher_model_dir: Path | None = None, grpc_port: int | None = None,
                 http_port: int | None = None, metrics_port: int | None = None, env: dict | None = None,
                 host: str = "127.0.0.1"):
        self.model_repository = Path(model_repository).resolve()
        self.data_dir = Path(data_dir).resolve()
        self.teacher_model_dir = teacher_model_dir
        self.host = host
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.version: str | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "triton.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _errors(self, offset: int) -> str:
        try:
            text = self.log_path.read_text(errors="replace")[offset:]
        except OSError:
            return ""
        lines = [line for line in text.splitlines() if _ERROR_LINE.search(line) and not _HARMLESS.search(line)]
        return "\n".join(lines[-25:]) or "\n".join(text.splitlines()[-25:])

    def start(self, timeout: float = 180, model: str = "teacher") -> "TritonServer":
        if self.running:
            return self
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        binary = _pytriton_root() / "bin" / "tritonserver"
        for port in (self.grpc_port, self.http_port, self.metrics_port):
            if not port_is_free(port, self.host):
                raise LaunchError(f"port {self.host}:{port} is taken; cannot start Triton there")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        argv = [str(binary), f"--model-repository={self.model_repository}",
                f"--backend-directory={ensure_backend()}", f"--grpc-port={self.grpc_port}",
                f"--http-port={self.http_port}", f"--metrics-port={self.metrics_port}",
                f"--grpc-address={self.host}", f"--http-address={self.host}", "--allow-metrics=true",
                "--allow-gpu-metrics=false", "--log-verbose=0", "--exit-on-error=true",
                "--strict-readiness=true"]
        started = time.monotonic()
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(argv, env=server_env(self.teacher_model_dir, self.env), stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        client = grpcclient.InferenceServerClient(self.grpc_url)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if not self.running:
                    raise LaunchError(f"tritonserver exited with code {self.proc.returncode} while loading "
                                      f"'{model}'; from {self.log_path}:\n{self._errors(offset)}")
                try:
                    if client.is_model_ready(model, client_timeout=2):
                        self.version = client.get_server_metadata(client_timeout=5).version
                        break
                except InferenceServerException:
                    pass
                if time.monotonic() > deadline:
                    errors = self._errors(offset)
                    self.kill()
                    raise LaunchError(f"model '{model}' not ready after {timeout}s; from {self.log_path}:\n{errors}")
                time.sleep(0.5)
        finally:
            client.close()
        log.info("triton_started", grpc=self.grpc_url, version=self.version, pid=self.proc.pid,
                 seconds=round(time.monotonic() - started, 1), teacher=str(self.teacher_model_dir))
        return self

    def stop(self, timeout: float = 30) -> None:
        if not self.running:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("triton_kill_after_timeout", timeout_s=timeout)
            self.kill()
        log.info("triton_stopped", grpc=self.grpc_url)

    def kill(self) -> None:
        if self.running:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
