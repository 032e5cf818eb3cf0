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
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path

from services.common.logging import get_logger
from services.stack.errors import LaunchError
from services.stack.processes import REPO_ROOT, ChildProcess, kill_group, stop_group
from services.stack.ports import free_port, port_is_free

log = get_logger(__name__)

MODEL_REPOSITORY = REPO_ROOT / "deploy" / "triton" / "model_repository"
CACHE = REPO_ROOT / ".cache" / "triton"
TEACHER_MODEL = "teacher"

# Lines of Triton's log that explain a failed start; NVML/DCGM/GPU lines are noise on a CPU host.
_ERROR_LINE = re.compile(r"^E\d{4} |^error:|failed to load|Traceback|Exception|Error:", re.IGNORECASE)
_HARMLESS = re.compile(r"nvml|dcgm|cuda|gpu|pinned memory", re.IGNORECASE)


def _pytriton_root() -> Path:
    import pytriton

    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def tritonserver_binary() -> Path:
    binary = _pytriton_root() / "bin" / "tritonserver"
    if not binary.is_file():
        raise LaunchError(f"no tritonserver binary at {binary}; is nvidia-pytriton installed?")
    return binary


def ensure_backend(cache: Path = CACHE) -> Path:
    """The folder to pass as --backend-directory: `<cache>/backends/python` holds a copy of the
    wheel's python backend with this interpreter's stub beside it. Copied once (into a temporary
    folder, then renamed), reused after."""
    root = _pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise LaunchError(f"nvidia-pytriton ships no python backend stub for Python {version} ({stub})")
    backends = cache / "backends"
    target = backends / "python"
    marker = target / f".complete-{version}"
    if not marker.exists():
        backends.mkdir(parents=True, exist_ok=True)
        tmp = backends / f".python.tmp-{uuid.uuid4().hex[:8]}"
        shutil.copytree(root / "backends" / "python", tmp, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, tmp / "triton_python_backend_stub")
        (tmp / f".complete-{version}").touch()
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race: its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    return backends


def server_env(teacher_model_dir: Path | None = None, extra: dict | None = None) -> dict[str, str]:
    """The environment tritonserver and the python stub need (see the module docstring)."""
    import pytriton

    site = Path(pytriton.__file__).resolve().parents[1]
    env = os.environ.copy()
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [
        sysconfig.get_config_var("LIBDIR"), str(site / "nvidia_pytriton.libs"), env.get("LD_LIBRARY_PATH")]))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), str(REPO_ROOT), env.get("PYTHONPATH")]))
    if teacher_model_dir is not None:
        env["DISTILL_TEACHER_MODEL_DIR"] = str(Path(teacher_model_dir).resolve())
    return env | {k: str(v) for k, v in (extra or {}).items()}


class TritonServer(ChildProcess):
    """tritonserver in its own session, log in `<data_dir>/triton.log`.

    `start()` returns once the model is ready over gRPC; a server that exits, or logs that the
    model failed to load, raises LaunchError quoting the server's own error lines.
    """

    def __init__(self, model_repository: Path = MODEL_REPOSITORY, data_dir: Path = Path(".distill/triton"),
                 teacher_model_dir: Path | None = None, grpc_port: int | None = None,
                 http_port: int | None = None, metrics_port: int | None = None, env: dict | None = None,
                 host: str = "127.0.0.1", model: str = TEACHER_MODEL):
        self.model_repository = Path(model_repository).resolve()
        self.data_dir = Path(data_dir).resolve()
        self.teacher_model_dir = Path(teacher_model_dir) if teacher_model_dir is not None else None
        self.host = host
        self.model = model
        self.grpc_port = grpc_port or free_port(host)
        self.http_port = http_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None
        self._version: str | None = None

    # -- endpoints -----------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "triton.log"

    @property
    def version(self) -> str:
        """The server's version (gRPC server metadata), e.g. "2.51.0"."""
        if self._version is None:
            import tritonclient.grpc as grpcclient

            client = grpcclient.InferenceServerClient(self.grpc_url)
            try:
                self._version = client.get_server_metadata(client_timeout=5).version
            finally:
                client.close()
        return self._version

    # -- lifecycle -----------------------------------------------------------------------------
    def argv(self) -> list[str]:
        return [
            str(tritonserver_binary()),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={ensure_backend()}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            # HTTP serves the /v2/health/ready probe the deployments use
            "--allow-http=true", f"--http-address={self.host}", f"--http-port={self.http_port}",
            "--allow-metrics=true", f"--metrics-port={self.metrics_port}", "--allow-gpu-metrics=false",
            "--log-verbose=0", "--exit-on-error=true", "--strict-readiness=true",
        ]

    def _log_text(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _errors(self, offset: int) -> str:
        """The server's own error lines since `offset` (else the log's tail)."""
        lines = self._log_text(offset).splitlines()
        errors = [line for line in lines if _ERROR_LINE.search(line) and not _HARMLESS.search(line)]
        return "\n".join(errors[-30:] or lines[-30:])

    def start(self, timeout: float = 180) -> "TritonServer":
        if self.running:
            return self
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        for port in (self.grpc_port, self.http_port, self.metrics_port):
            if not port_is_free(port, self.host):
                raise LaunchError(f"port {self.host}:{port} is taken; cannot start Triton there")
        argv = self.argv()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        started = time.monotonic()
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(argv, env=server_env(self.teacher_model_dir, self.env), stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        log.info("triton_starting", pid=self.proc.pid, grpc=self.grpc_url, log=str(self.log_path),
                 teacher=str(self.teacher_model_dir))
        client = grpcclient.InferenceServerClient(self.grpc_url)
        failed_load = re.compile(rf"failed to load '{re.escape(self.model)}'")
        deadline = started + timeout
        try:
            while True:
                if not self.running:
                    raise LaunchError(f"tritonserver exited with code {self.proc.returncode} before '{self.model}' "
                                      f"was ready; its errors ({self.log_path}):\n{self._errors(offset)}")
                if failed_load.search(self._log_text(offset)):
                    errors = self._errors(offset)
                    self.kill()
                    raise LaunchError(f"Triton failed to load '{self.model}'; its errors ({self.log_path}):\n{errors}")
                try:
                    if client.is_model_ready(self.model, client_timeout=2):
                        break
                except InferenceServerException:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    errors = self._errors(offset)
                    self.kill()
                    raise LaunchError(f"'{self.model}' not ready after {timeout:.0f}s; from {self.log_path}:\n{errors}")
                time.sleep(0.25)
            self._version = client.get_server_metadata(client_timeout=5).version
        except BaseException:
            self.kill()
            raise
        finally:
            client.close()
        self.start_seconds = round(time.monotonic() - started, 2)
        log.info("triton_ready", grpc=self.grpc_url, version=self._version, pid=self.proc.pid,
                 seconds=self.start_seconds)
        return self

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM to the server's process group (the stubs go with it), SIGKILL after `timeout`."""
        if self.proc is None:
            return
        if not stop_group(self.proc, timeout):
            log.warning("triton_killed_after_timeout", timeout_s=timeout, pid=self.proc.pid)
        self.kill()  # the python backend stubs of this server go with it
        log.info("triton_stopped", grpc=self.grpc_url, returncode=self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL to the whole process group (server and python stubs), then reap."""
        kill_group(self.proc)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
