"""The whole system on one machine: a Kafka broker, Triton with the teacher, and every service.

One launcher for `distill up`, `distill demo`, the end-to-end tests and the benchmarks. State
lives under one data directory:

    <data_dir>/kafka/        broker storage and kafka.log
    <data_dir>/triton/       triton.log
    <data_dir>/models/       the small teacher and student made on first use
    <data_dir>/datasets/     Parquet shards and manifests (sink)
    <data_dir>/runs/         student checkpoints (trainer)
    <data_dir>/logs/         one JSON log per service process
    <data_dir>/stack.json    endpoints of the running stack (read by `distill submit/watch/status`)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.common.config import CommonSettings
from services.common.logging import get_logger
from services.stack.errors import LaunchError
from services.stack.kafka import KafkaBroker, create_topics, default_topics, ensure_jars
from services.stack.ports import free_port, port_is_free
from services.stack.processes import REPO_ROOT, ServiceProcess
from services.stack.triton import TritonServer

log = get_logger(__name__)

MODEL_REPOSITORY = REPO_ROOT / "deploy" / "triton" / "model_repository"
SERVICES = ("producer", "teacher", "sink", "trainer")


def _port(preferred: int | None) -> int:
    """The preferred port when free, else any free port (two stacks never collide)."""
    if preferred and port_is_free(preferred):
        return preferred
    return free_port()


@dataclass
class StackConfig:
    data_dir: Path = Path(".distill")
    teacher_replicas: int = 1
    partitions: int = 4
    topic_prefix: str = "distill."
    kafka_port: int | None = 9092
    triton_grpc_port: int | None = 8001
    producer_grpc_port: int | None = 50051
    trainer_grpc_port: int | None = 50052
    teacher_model_dir: Path | None = None
    student_dir: Path | None = None
    teacher_train_seconds: float = 60.0
    # Extra DISTILL_ settings for every service (e.g. {"SHARD_MAX_AGE_S": "5"}).
    settings: dict[str, str] = field(default_factory=dict)
    # Per-service extra settings, e.g. {"trainer": {"RUN_ID": "r1"}}.
    service_settings: dict[str, dict[str, str]] = field(default_factory=dict)
    services: tuple[str, ...] = SERVICES
    # Use servers already running instead of starting them (tests share one per session).
    external_kafka: str | None = None
    external_triton: str | None = None


class LocalStack:
    def __init__(self, config: StackConfig):
        self.config = config
        self.data_dir = config.data_dir.resolve()
        self.broker: KafkaBroker | None = None
        self.triton: TritonServer | None = None
        self.processes: dict[str, list[ServiceProcess]] = {}
        self.endpoints: dict[str, str] = {}

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> "LocalStack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def ensure_models(self) -> tuple[Path, Path]:
        from services.stack.models import ensure_models

        if self.config.teacher_model_dir and self.config.student_dir:
            return self.config.teacher_model_dir, self.config.student_dir
        teacher, student = ensure_models(self.data_dir / "models", train_seconds=self.config.teacher_train_seconds)
        return self.config.teacher_model_dir or teacher, self.config.student_dir or student

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.config.external_kafka:
            ensure_jars()
        teacher_dir, student_dir = self.ensure_models()
        self.teacher_dir, self.student_dir = teacher_dir, student_dir
        self.start_kafka()
        self.start_triton()
        for name in self.config.services:
            replicas = self.config.teacher_replicas if name == "teacher" else 1
            for i in range(replicas):
                self.start_service(name, i)
        for processes in self.processes.values():
            for process in processes:
                self.wait_ready(process)
        self.write_endpoints()

    def wait_ready(self, process: ServiceProcess, timeout: float = 180) -> None:
        """Until the service's gRPC health answers SERVING (it does once its consumer, producer and
        stage are up); a process that exits first is reported with its log."""
        from services.common.health import check_health

        deadline = time.monotonic() + timeout
        while not check_health(process.grpc_target, timeout=1.0):
            if not process.running:
                raise LaunchError(f"{process.name} exited with code {process.proc.returncode} while starting; "
                                  f"{process.log_path} ends with:\n{process.log_tail(40)}")
            if time.monotonic() > deadline:
                raise LaunchError(f"{process.name} not healthy after {timeout:.0f}s; "
                                  f"{process.log_path} ends with:\n{process.log_tail(40)}")
            time.sleep(0.3)

    def start_kafka(self) -> None:
        if self.config.external_kafka:
            create_topics(self.config.external_kafka, default_topics(self.config.topic_prefix, self.config.partitions))
            self.endpoints["kafka"] = self.config.external_kafka
            return
        self.broker = KafkaBroker(self.data_dir / "kafka", port=_port(self.config.kafka_port),
                                  partitions=self.config.partitions)
        self.broker.start()
        create_topics(self.broker.bootstrap, default_topics(self.config.topic_prefix, self.config.partitions))
        self.endpoints["kafka"] = self.broker.bootstrap

    def start_triton(self) -> None:
        if self.config.external_triton:
            self.endpoints["triton"] = self.config.external_triton
            return
        self.triton = TritonServer(
            MODEL_REPOSITORY,
            self.data_dir / "triton",
            teacher_model_dir=self.teacher_dir,
            grpc_port=_port(self.config.triton_grpc_port),
        )
        self.triton.start()
        self.endpoints["triton"] = self.triton.grpc_url

    def service_env(self, name: str) -> dict[str, str]:
        env = {
            "DISTILL_DATA_DIR": str(self.data_dir),
            "DISTILL_KAFKA_BOOTSTRAP": self.endpoints["kafka"],
            "DISTILL_TOPIC_PREFIX": self.config.topic_prefix,
            "DISTILL_TRITON_URL": self.endpoints.get("triton", ""),
            "DISTILL_STUDENT_DIR": str(self.student_dir),
            "DISTILL_TEACHER_REGISTRY": str(REPO_ROOT / "deploy" / "teachers.yaml"),
        }
        env |= {f"DISTILL_{k.upper()}": str(v) for k, v in self.config.settings.items()}
        env |= {f"DISTILL_{k.upper()}": str(v) for k, v in self.config.service_settings.get(name, {}).items()}
        return env

    def start_service(self, name: str, index: int = 0) -> ServiceProcess:
        env = self.service_env(name)
        if name == "producer":
            port = _port(self.config.producer_grpc_port)
            env["DISTILL_GRPC_PORT"] = str(port)
            self.endpoints["producer"] = f"127.0.0.1:{port}"
        elif name == "trainer":
            port = _port(self.config.trainer_grpc_port)
            env["DISTILL_GRPC_PORT"] = str(port)
            self.endpoints["trainer"] = f"127.0.0.1:{port}"
        else:
            port = free_port()
            env["DISTILL_GRPC_PORT"] = str(port)
        process = ServiceProcess(
            f"{name}-{index}", f"services.{name}", env, self.data_dir / "logs" / f"{name}-{index}.log"
        ).start()
        process.grpc_target = f"127.0.0.1:{port}"
        replicas = self.processes.setdefault(name, [])
        if index < len(replicas):
            replicas[index] = process
        else:
            replicas.append(process)
        return process

    def settings(self, **overrides) -> CommonSettings:
        """Client settings pointing at this stack."""
        return CommonSettings(
            kafka_bootstrap=self.endpoints["kafka"],
            topic_prefix=self.config.topic_prefix,
            data_dir=self.data_dir,
            **overrides,
        )

    def write_endpoints(self) -> Path:
        path = self.data_dir / "stack.json"
        body = {"pid": os.getpid(), "topic_prefix": self.config.topic_prefix, **self.endpoints,
                "processes": {name: [p.pid for p in ps] for name, ps in self.processes.items()}}
        path.write_text(json.dumps(body, indent=2))
        return path

    def dead_processes(self) -> list[ServiceProcess]:
        return [p for ps in self.processes.values() for p in ps if not p.running]

    def stop(self) -> None:
        """Services first (they flush and commit), then Triton, then the broker."""
        for name in reversed(SERVICES):
            for process in self.processes.get(name, []):
                process.stop()
        if self.triton is not None:
            self.triton.stop()
        if self.broker is not None:
            self.broker.stop()
        (self.data_dir / "stack.json").unlink(missing_ok=True)
        log.info("stack_stopped", data_dir=str(self.data_dir))


def read_endpoints(data_dir: Path) -> dict:
    """Endpoints of a running `distill up` (empty when none)."""
    try:
        return json.loads((data_dir / "stack.json").read_text())
    except (OSError, ValueError):
        return {}
