"""Supervised child processes of the local stack: one class for every service process.

Each runs `python -m services.<name>` with DISTILL_ settings in its environment, its own session
(so a signal to the stack's terminal does not reach it twice), stdout+stderr appended to a log file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.common.logging import get_logger

log = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


def stop_group(proc: subprocess.Popen | None, timeout: float) -> bool:
    """SIGTERM to the process group of `proc` (started with start_new_session), SIGKILL if it is
    still alive after `timeout` s. True when it stopped on SIGTERM."""
    if proc is None or proc.poll() is not None:
        return True
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return False


def kill_group(proc: subprocess.Popen | None) -> None:
    """SIGKILL to the whole process group now, then reap."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class ChildProcess:
    """What every local server or service process answers: is it running, its pid, its log."""

    proc: subprocess.Popen | None = None
    log_path: Path

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class ServiceProcess(ChildProcess):
    def __init__(self, name: str, module: str, env: dict[str, str], log_path: Path):
        self.name = name
        self.module = module
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.grpc_target: str | None = None

    def start(self) -> "ServiceProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = os.environ.copy() | self.env
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module],
                cwd=REPO_ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        log.info("process_started", process=self.name, pid=self.proc.pid, log=str(self.log_path))
        return self

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the service finishes its turn, flushes, commits), SIGKILL after `timeout`."""
        if not stop_group(self.proc, timeout):
            log.warning("process_killed_after_timeout", process=self.name, timeout_s=timeout)
        return self.proc.returncode if self.proc else None

    def kill(self) -> int | None:
        kill_group(self.proc)
        return self.proc.returncode if self.proc else None


def wait_for(condition, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll `condition()` until it returns a truthy value; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
