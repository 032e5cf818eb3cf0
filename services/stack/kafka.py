"""The local Apache Kafka 4.x broker: jars from Maven Central (deploy/kafka/pom.xml), KRaft storage
formatted once (`--standalone`, combined broker+controller, one node), `kafka.Kafka` started with
`java`, ready when it answers a metadata request, stopped with SIGTERM then SIGKILL.

Used by `distill up`, the demo, the tests (tests/fixtures/kafka.py) and the benchmarks.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from services.common.config import DEAD_LETTERS, PROMPTS, TEACHER_OUTPUTS, TOPICS
from services.common.logging import get_logger
from services.stack.errors import LaunchError
from services.stack.ports import free_port, port_accepts, port_is_free

log = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
POM = REPO_ROOT / "deploy" / "kafka" / "pom.xml"
LOG4J2 = REPO_ROOT / "deploy" / "kafka" / "log4j2.yaml"
KAFKA_VERSION = re.search(r"<kafka.version>([^<]+)</kafka.version>", POM.read_text()).group(1)
CACHE = REPO_ROOT / ".cache" / "kafka"


def ensure_jars(cache_dir: Path | None = None) -> Path:
    """The folder of the broker's runtime jars, fetched by Maven once per machine (idempotent:
    a marker holding the pom's sha256 says the folder is complete)."""
    libs = (cache_dir or CACHE) / f"kafka-{KAFKA_VERSION}" / "libs"
    marker = libs.parent / "complete.sha256"
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()
    if marker.exists() and marker.read_text().strip() == digest and libs.is_dir():
        return libs
    if shutil.which("mvn") is None:
        raise LaunchError("Maven (mvn) is needed once to fetch the Kafka jars from Maven Central; install maven")
    libs.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=libs.parent, prefix="libs.tmp-") as tmp:
        result = subprocess.run(
            ["mvn", "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
             "-DincludeScope=runtime", f"-DoutputDirectory={tmp}"],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
            raise LaunchError(f"mvn could not fetch the Kafka {KAFKA_VERSION} jars:\n{tail}")
        if libs.exists():
            shutil.rmtree(libs)
        os.rename(tmp, libs)
        os.mkdir(tmp)  # TemporaryDirectory cleans up the name it made
    marker.write_text(digest)
    log.info("kafka_jars_fetched", version=KAFKA_VERSION, jars=len(list(libs.glob("*.jar"))),
             seconds=round(time.monotonic() - started, 1))
    return libs


def default_topics(prefix: str = "distill.", partitions: int = 4) -> dict[str, int]:
    """Topic -> partitions. Prompts and teacher outputs scale out; shards stay in order (one
    partition); checkpoints and dead letters are low-volume."""
    return {f"{prefix}{name}": (partitions if name in (PROMPTS, TEACHER_OUTPUTS) else 1) for name in TOPICS}


def create_topics(bootstrap: str, topics: dict[str, int], replication: int = 1,
                  configs: dict[str, str] | None = None, timeout: float = 60) -> None:
    """Create the topics that do not exist yet, then wait until metadata shows them all."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="distill-topics")
    try:
        existing = set(admin.list_topics())
        wanted = [NewTopic(name, n, replication, topic_configs=dict(configs or {}))
                  for name, n in topics.items() if name not in existing]
        if wanted:
            try:
                admin.create_topics(wanted)
            except TopicAlreadyExistsError:
                pass
        deadline = time.monotonic() + timeout
        while not set(topics) <= set(admin.list_topics()):
            if time.monotonic() > deadline:
                raise LaunchError(f"topics {sorted(set(topics) - set(admin.list_topics()))} not visible after {timeout}s")
            time.sleep(0.2)
    finally:
        admin.close()
    if wanted:
        log.info("topics_created", topics={t.name: t.num_partitions for t in wanted})


class KafkaBroker:
    """One KRaft node (broker + controller). Data and log under `data_dir`; restartable."""

    def __init__(self, data_dir: Path, port: int | None = None, controller_port: int | None = None,
                 host: str = "127.0.0.1", heap: str = "768m", partitions: int = 4,
                 extra_config: dict[str, str] | None = None):
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port = port or free_port(host)
        self.controller_port = controller_port or free_port(host)
        self.heap = heap
        self.partitions = partitions
        self.extra_config = extra_config or {}
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "kafka.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _properties(self) -> Path:
        config = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"{self.host}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir / "data"),
            "num.partitions": str(self.partitions),
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "message.max.bytes": str(16 * 1024 * 1024),
            "replica.fetch.max.bytes": str(16 * 1024 * 1024),
            "log.flush.interval.messages": "1000",
        } | self.extra_config
        path = self.data_dir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in config.items()))
        return path

    def _java(self, libs: Path, main: str, *args: str, heap: str = "256m") -> list[str]:
        return ["java", f"-Xmx{heap}", "-XX:+UseG1GC", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={LOG4J2}", "-cp", f"{libs}/*", main, *args]

    def _format(self, libs: Path, properties: Path) -> None:
        if (self.data_dir / "data" / "meta.properties").exists():
            return
        cluster_file = self.data_dir / "cluster.id"
        if not cluster_file.exists():
            # a base64url 16-byte uuid, as `kafka-storage random-uuid` makes
            import base64

            cluster_file.write_text(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))
        result = subprocess.run(
            self._java(libs, "kafka.tools.StorageTool", "format", "--standalone", "--ignore-formatted",
                       "-t", cluster_file.read_text().strip(), "-c", str(properties)),
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise LaunchError(f"formatting Kafka storage failed:\n{(result.stdout + result.stderr)[-3000:]}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def start(self, timeout: float = 90) -> "KafkaBroker":
        if self.running:
            return self
        libs = ensure_jars()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for port in (self.port, self.controller_port):
            if not port_is_free(port, self.host):
                raise LaunchError(f"port {self.host}:{port} is taken; cannot start the Kafka broker there")
        properties = self._properties()
        started = time.monotonic()
        self._format(libs, properties)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self._java(libs, "kafka.Kafka", str(properties), heap=self.heap),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if not self.running:
                raise LaunchError(f"the Kafka broker exited with code {self.proc.returncode} while starting; "
                                  f"{self.log_path} ends with:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise LaunchError(f"the Kafka broker did not answer metadata requests within {timeout}s; "
                                  f"{self.log_path} ends with:\n{self.log_tail()}")
            time.sleep(0.3)
        log.info("kafka_started", bootstrap=self.bootstrap, version=KAFKA_VERSION, pid=self.proc.pid,
                 seconds=round(time.monotonic() - started, 1), data_dir=str(self.data_dir))
        return self

    def _answers(self) -> bool:
        """True when the broker answers a metadata request (an open port is not enough)."""
        if not port_accepts(self.port, self.host):
            return False
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        try:
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="distill-ready",
                                     request_timeout_ms=3000)
        except Exception:  # noqa: BLE001 - any failure to connect means "not ready yet"
            return False
        try:
            cluster = admin.describe_cluster()
            return bool(cluster.get("brokers"))
        except (KafkaError, OSError, ValueError):
            return False
        finally:
            admin.close()

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (controlled shutdown), SIGKILL after `timeout`."""
        if not self.running:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("kafka_kill_after_timeout", timeout_s=timeout)
            self.kill()
        log.info("kafka_stopped", bootstrap=self.bootstrap)

    def kill(self) -> None:
        """SIGKILL now (what the chaos tests do)."""
        if self.running:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "KafkaBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
