"""The local Apache Kafka 4.x broker, run straight from its Maven Central jars.

- `ensure_jars()` fetches the broker's runtime jars once per machine with Maven
  (deploy/kafka/pom.xml pins every version) into `.cache/kafka/<version>/libs`.
- `KafkaBroker` is one KRaft node (combined broker + controller, node.id 1): storage formatted
  once (`--standalone`, cluster id kept in the data dir), `kafka.Kafka` started with `java`, ready
  when it answers a metadata request with its own cluster id, stopped with SIGTERM then SIGKILL.
  Stop/kill and start again on the same data dir and ports is supported (the chaos tests do it).
- `default_topics()` and `create_topics()` lay out the project's topics (DESIGN.md s2).

Used by `distill up`, the demo, the tests (tests/fixtures/kafka.py) and the benchmarks.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from services.common.config import PROMPTS, TEACHER_OUTPUTS, TOPICS
from services.common.logging import get_logger
from services.stack.errors import LaunchError
from services.stack.processes import REPO_ROOT, ChildProcess, kill_group, stop_group
from services.stack.ports import free_port, port_accepts, port_is_free

log = get_logger(__name__)

POM = REPO_ROOT / "deploy" / "kafka" / "pom.xml"
LOG4J2 = REPO_ROOT / "deploy" / "kafka" / "log4j2.yaml"
# The pom is the one place the version is pinned.
KAFKA_VERSION: str = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text()).group(1)
CACHE_ROOT = REPO_ROOT / ".cache" / "kafka"
MARKER = ".pom.sha256"  # inside the libs folder: written before the folder is renamed into place
MVN_TIMEOUT_S = 1800
LOG_TAIL_LINES = 40


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def ensure_jars(cache_dir: Path | None = None) -> Path:
    """The folder holding the broker's runtime jars (default `<repo>/.cache/kafka/<version>/libs`).

    Idempotent and cheap once done: a marker inside the folder holds the sha256 of the pom that
    filled it; when it matches, the folder is returned at once. Otherwise Maven copies the
    runtime dependencies into a temporary folder beside it, the marker is written there, and the
    folder is renamed into place, so a half-filled folder is never taken for a complete one.
    Concurrent callers are serialised by a file lock. Raises LaunchError (with Maven's output
    tail) when mvn is missing or fails.
    """
    libs = Path(cache_dir) if cache_dir is not None else CACHE_ROOT / KAFKA_VERSION / "libs"
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()
    marker = libs / MARKER

    def complete() -> bool:
        try:
            return marker.read_text().strip() == digest
        except OSError:
            return False

    if complete():
        return libs
    libs.parent.mkdir(parents=True, exist_ok=True)
    with open(libs.parent / f".{libs.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be fetching the same jars
        if complete():
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise LaunchError("Maven (mvn) is needed once per machine to fetch the Kafka jars from "
                              "Maven Central; install maven (and Java 17+)")
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(dir=libs.parent, prefix=f".{libs.name}.tmp-"))
        try:
            cmd = [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
                   f"-DoutputDirectory={tmp}", "-DincludeScope=runtime"]
            log.info("kafka_jars_fetching", version=KAFKA_VERSION, into=str(libs))
            try:
                result = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                        timeout=MVN_TIMEOUT_S)
            except subprocess.TimeoutExpired as exc:
                raise LaunchError(f"mvn did not finish fetching the Kafka {KAFKA_VERSION} jars within "
                                  f"{MVN_TIMEOUT_S}s:\n{_tail(str(exc.stdout or '') + str(exc.stderr or ''))}") from exc
            if result.returncode != 0:
                raise LaunchError(f"mvn could not fetch the Kafka {KAFKA_VERSION} jars (exit {result.returncode}); "
                                  f"its output ends with:\n{_tail(result.stdout + result.stderr)}")
            jars = sorted(tmp.glob("*.jar"))
            if not any(j.name.startswith(f"kafka_2.13-{KAFKA_VERSION}") for j in jars):
                raise LaunchError(f"mvn succeeded but kafka_2.13-{KAFKA_VERSION}.jar is not among the "
                                  f"{len(jars)} jars it copied into {tmp}")
            (tmp / MARKER).write_text(digest + "\n")
            if libs.exists():  # stale (another pom): move it aside, then swap
                old = libs.with_name(f".{libs.name}.old-{uuid.uuid4().hex[:8]}")
                os.rename(libs, old)
                os.rename(tmp, libs)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, libs)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    size_mb = sum(j.stat().st_size for j in libs.glob("*.jar")) / 2**20
    log.info("kafka_jars_fetched", version=KAFKA_VERSION, jars=len(jars), size_mb=round(size_mb, 1),
             seconds=round(time.monotonic() - started, 1), libs=str(libs))
    return libs


def default_topics(prefix: str = "distill.", partitions: int = 4) -> dict[str, int]:
    """Topic name -> partition count for the project's topics under `prefix`.

    Prompts and teacher outputs get `partitions` (teacher-inference and sink replicas scale up
    to it); shards get one partition, so the trainer reads them in the order they were written;
    checkpoints and dead letters are low-volume and keep their order with one.
    """
    return {f"{prefix}{name}": (partitions if name in (PROMPTS, TEACHER_OUTPUTS) else 1) for name in TOPICS}


def create_topics(bootstrap: str, topics: dict[str, int], replication: int = 1,
                  configs: dict[str, str] | None = None, timeout: float = 60) -> None:
    """Create the topics of `topics` (name -> partitions) that do not exist yet, with `configs`
    applied to each new one, then wait until metadata shows every topic with a leader on every
    partition. Idempotent: existing topics are left as they are (a concurrent creator's
    TopicAlreadyExistsError is ignored)."""
    from kafka import KafkaAdminClient
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="distill-topics",
                             bootstrap_timeout_ms=int(timeout * 1000))
    try:
        existing = set(admin.list_topics())
        wanted = {name: n for name, n in topics.items() if name not in existing}
        if wanted:
            request = {name: {"num_partitions": n, "replication_factor": replication,
                              "configs": dict(configs or {})} for name, n in wanted.items()}
            try:
                admin.create_topics(request, timeout_ms=int(timeout * 1000))
            except TopicAlreadyExistsError:
                # Someone else created one of them meanwhile; create the rest one by one.
                for name, spec in request.items():
                    try:
                        admin.create_topics({name: spec}, timeout_ms=int(timeout * 1000))
                    except TopicAlreadyExistsError:
                        pass
        _wait_for_topics(admin, list(topics), timeout)
    finally:
        admin.close()
    if wanted:
        log.info("topics_created", bootstrap=bootstrap, topics=wanted, replication=replication)


def _wait_for_topics(admin, names: list[str], timeout: float) -> None:
    """Until every topic in `names` is in metadata with a leader on each partition."""
    deadline = time.monotonic() + timeout
    while True:
        by_name = {t["name"]: t for t in admin.describe_topics(names)}
        missing = [n for n in names if not _topic_ready(by_name.get(n))]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise LaunchError(f"topics {missing} not ready in metadata after {timeout:.0f}s")
        time.sleep(0.2)


def _topic_ready(topic: dict | None) -> bool:
    return bool(topic) and topic.get("error_code", 0) == 0 and bool(topic.get("partitions")) and all(
        p.get("error_code", 0) == 0 and p.get("leader_id", -1) >= 0 for p in topic["partitions"])


def _new_cluster_id() -> str:
    """A cluster id as `kafka-storage random-uuid` makes it: 16 random bytes, base64url without
    padding; never starting with '-' (the storage tool would read it as an option)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


class KafkaBroker(ChildProcess):
    """One local KRaft node (broker + controller); data, config and log under `data_dir`.

    Ports are chosen once, in the constructor (free ones unless given), so a restart after
    `stop()` or `kill()` comes back on the same bootstrap address with the same data.
    """

    def __init__(self, data_dir: Path, port: int | None = None, controller_port: int | None = None,
                 host: str = "127.0.0.1", heap: str = "768m", partitions: int = 4,
                 extra_config: dict[str, str] | None = None):
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port = port or free_port(host)
        self.controller_port = controller_port or free_port(host)
        if self.controller_port == self.port:
            raise ValueError(f"the broker and controller ports must differ (both {self.port})")
        self.heap = heap
        self.partitions = partitions
        self.extra_config = dict(extra_config or {})
        self.proc: subprocess.Popen | None = None

    # -- what callers read -------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "kafka.log"

    @property
    def properties_path(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def cluster_id(self) -> str:
        """The KRaft cluster id, made on the first start and kept in the data dir for restarts."""
        path = self.data_dir / "cluster.id"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(_new_cluster_id() + "\n")
        return path.read_text().strip()


    # -- start and stop ------------------------------------------------------------------------

    def config(self) -> dict[str, str]:
        """The server.properties of this node (`extra_config` wins over the defaults)."""
        max_bytes = str(16 * 1024 * 1024)
        return {
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
            "default.replication.factor": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "min.insync.replicas": "1",
            "group.initial.rebalance.delay.ms": "0",
            # After a kill, the restarted node cannot register until its previous incarnation's
            # session expires (default 9 s); one local node can afford a short session.
            "broker.session.timeout.ms": "3000",
            "broker.heartbeat.interval.ms": "1000",
            "auto.create.topics.enable": "false",
            "message.max.bytes": max_bytes,
            "replica.fetch.max.bytes": max_bytes,
            "socket.request.max.bytes": str(104857600),
        } | self.extra_config

    def _write_properties(self) -> Path:
        lines = ["# Written by services/stack/kafka.py on every start; edits are overwritten.\n"]
        lines += [f"{k}={v}\n" for k, v in self.config().items()]
        self.properties_path.write_text("".join(lines))
        return self.properties_path

    def _java(self, libs: Path, main: str, *args: str, heap: str) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise LaunchError("java (17 or newer) is needed to run the Kafka broker; it is not on PATH")
        return [java, f"-Xmx{heap}", "-XX:+UseG1GC", "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={LOG4J2}",
                "-cp", f"{libs}/*", main, *args]

    def _formatted(self) -> bool:
        return (self.data_dir / "data" / "meta.properties").exists()

    def _format(self, libs: Path, properties: Path) -> bool:
        """Format the storage (KRaft, standalone controller) unless it already is; True if it ran."""
        if self._formatted():
            return False
        cmd = self._java(libs, "kafka.tools.StorageTool", "format", "--standalone",
                         "-t", self.cluster_id, "-c", str(properties), heap="256m")
        result = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
        with open(self.log_path, "a") as out:  # keep the tool's words with the broker's
            out.write(result.stdout + result.stderr)
        if result.returncode != 0 or not self._formatted():
            raise LaunchError(f"formatting the Kafka storage in {self.data_dir / 'data'} failed "
                              f"(exit {result.returncode}):\n{_tail(result.stdout + result.stderr)}")
        return True

    def start(self, timeout: float = 90) -> "KafkaBroker":
        """Start the node and return once it answers metadata requests; LaunchError (with the
        last lines of its log) if a port is taken, the process exits, or `timeout` passes."""
        if self.running:
            return self
        libs = ensure_jars()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for what, port in (("broker", self.port), ("controller", self.controller_port)):
            if not port_is_free(port, self.host):
                raise LaunchError(f"the Kafka {what} port {self.host}:{port} is taken; "
                                  "stop what listens there or pass another port")
        started = time.monotonic()
        properties = self._write_properties()
        formatted = self._format(libs, properties)
        cmd = self._java(libs, "kafka.Kafka", str(properties), heap=self.heap)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=self.data_dir, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        log.info("kafka_starting", bootstrap=self.bootstrap, pid=self.proc.pid, data_dir=str(self.data_dir),
                 formatted_now=formatted, log=str(self.log_path))
        deadline = started + timeout
        try:
            while True:
                if not self.running:
                    raise LaunchError(f"the Kafka broker exited with code {self.proc.returncode} while starting; "
                                      f"{self.log_path} ends with:\n{self.log_tail()}")
                if self._answers():
                    break
                if time.monotonic() > deadline:
                    raise LaunchError(f"the Kafka broker did not answer metadata requests on {self.bootstrap} "
                                      f"within {timeout:.0f}s; {self.log_path} ends with:\n{self.log_tail()}")
                time.sleep(0.25)
        except BaseException:
            self.kill()
            raise
        log.info("kafka_started", bootstrap=self.bootstrap, version=KAFKA_VERSION, pid=self.proc.pid,
                 cold=formatted, seconds=round(time.monotonic() - started, 2), cluster_id=self.cluster_id)
        return self

    def _answers(self) -> bool:
        """True when this node answers a metadata (DescribeCluster) request with its own cluster
        id and lists itself unfenced: an open port, or another broker on it, is not enough."""
        if not port_accepts(self.port, self.host):
            return False
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        try:
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="distill-ready",
                                     request_timeout_ms=5000, bootstrap_timeout_ms=5000)
        except (KafkaError, OSError, ValueError):
            return False
        try:
            cluster = admin.describe_cluster()
        except (KafkaError, OSError, ValueError):
            return False
        finally:
            admin.close()
        if cluster.get("cluster_id") != self.cluster_id:
            raise LaunchError(f"{self.bootstrap} answers with cluster id {cluster.get('cluster_id')!r}, "
                              f"not this node's {self.cluster_id!r}: another broker holds the port")
        return any(b.get("broker_id") == 1 and not b.get("is_fenced", False) for b in cluster.get("brokers", []))

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (controlled shutdown, logs flushed), SIGKILL if still alive after `timeout` s."""
        if not self.running:
            return
        begun = time.monotonic()
        if not stop_group(self.proc, timeout):
            log.warning("kafka_killed_after_timeout", bootstrap=self.bootstrap, timeout_s=timeout)
        log.info("kafka_stopped", bootstrap=self.bootstrap, code=self.proc.returncode,
                 seconds=round(time.monotonic() - begun, 2))

    def kill(self) -> None:
        """SIGKILL now, no controlled shutdown (what the chaos tests do)."""
        if not self.running:
            return
        kill_group(self.proc)
        log.info("kafka_killed", bootstrap=self.bootstrap)

    def __enter__(self) -> "KafkaBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
