"""Parquet shards of the dataset: buffered per input partition, closed on size or age, written
atomically, described by a JSON manifest, dedup'd on (prompt id, teacher revision).

Layout under `<root>/<dataset>/`:

    shard-<topic>-p<partition>-<first offset>-<last offset>.parquet   the rows (zstd)
    <same name>.manifest.json                                         sha256, counts, offsets, keys
    <same name>.announced                                             ShardReady was published

Why one buffer per input partition: a shard then covers one contiguous offset range of one
partition, so its name is a function of what it covers (a rewrite after a crash lands on the same
name instead of beside it), and "everything below offset X of partition P is durable" is a fact
the loop can commit. Teacher outputs are keyed by prompt id, so every copy of a prompt's output
lands in the same partition and per-partition dedup is dedup of the whole dataset.

Crash safety, in write order: Parquet to a temporary name, fsync, rename, fsync the folder; then
the manifest the same way. At start, temporaries are deleted, and a shard file without a manifest
is deleted too (its offsets were never committed, so they are consumed and written again). The
dedup index and the durable offsets per partition are rebuilt from the manifests.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from google.protobuf import json_format

from distillery.v1 import common_pb2, dataset_pb2
from services.common.files import sha256_file, write_atomic
from services.common.dataset import SCHEMA, SCHEMA_VERSION, rows_to_table
from services.common.logging import get_logger

log = get_logger(__name__)

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
TEACHER_FIELDS = {
    "teacher_model": "model_name", "teacher_version": "model_version", "teacher_revision": "revision",
    "teacher_tokenizer_hash": "tokenizer_hash", "teacher_vocab_size": "vocab_size",
    "triton_version": "triton_version", "teacher_license": "license",
    "distillation_permitted": "distillation_permitted", "policy_override": "policy_override",
    "teacher_owner": "owner",
}


def _safe_name(value: str, what: str) -> str:
    if not _SAFE.match(value) or ".." in value:
        raise ValueError(f"{what} {value!r} must be a plain name (letters, digits, '.', '_', '-')")
    return value


@dataclass
class ShardInfo:
    shard_id: str
    dataset: str
    uri: str
    manifest_uri: str
    sha256: str
    bytes: int
    record_count: int
    token_count: int
    offsets: list[dict]
    teachers: list[dict]
    created_at: str
    schema_version: int = SCHEMA_VERSION

    def to_proto(self) -> dataset_pb2.ShardReady:
        message = dataset_pb2.ShardReady(
            dataset=self.dataset, shard_id=self.shard_id, uri=self.uri, manifest_uri=self.manifest_uri,
            record_count=self.record_count, bytes=self.bytes, sha256=self.sha256,
            token_count=self.token_count, schema_version=self.schema_version,
        )
        for o in self.offsets:
            message.offsets.add(topic=o["topic"], partition=o["partition"], first=o["first"], last=o["last"])
        for t in self.teachers:
            message.teachers.append(json_format.ParseDict(t, common_pb2.TeacherIdentity()))
        message.created_at.FromJsonString(self.created_at)
        return message

    @classmethod
    def from_manifest(cls, body: dict) -> "ShardInfo":
        return cls(**{k: body[k] for k in cls.__dataclass_fields__ if k in body})


@dataclass
class _Buffer:
    topic: str
    partition: int
    first: int
    last: int
    started: float
    rows: list[dict] = field(default_factory=list)
    bytes: int = 0


class ShardWriter:
    def __init__(self, root: Path, dataset: str, writer_id: str = "", max_rows: int = 5000,
                 max_bytes: int = 64 * 1024 * 1024, max_age_s: float = 30.0, clock=time.monotonic):
        self.dataset = _safe_name(dataset, "dataset name")
        self.dir = (Path(root) / self.dataset).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer_id = writer_id
        self.max_rows, self.max_bytes, self.max_age_s = max_rows, max_bytes, max_age_s
        self.clock = clock
        self.buffers: dict[tuple[str, int], _Buffer] = {}
        self.keys: dict[tuple[str, int], set[tuple[str, str]]] = {}
        self.durable: dict[tuple[str, int], int] = {}
        self.deduplicated = 0
        self._clean()

    # -- start-up ------------------------------------------------------------------------------
    def _clean(self) -> None:
        for tmp in self.dir.glob("*.tmp-*"):
            tmp.unlink(missing_ok=True)
        for shard in self.dir.glob("shard-*.parquet"):
            if not self._manifest_path(shard).exists():
                log.warning("orphan_shard_removed", path=str(shard))
                shard.unlink()

    @staticmethod
    def _manifest_path(shard: Path) -> Path:
        return shard.with_name(shard.name.removesuffix(".parquet") + ".manifest.json")

    def _prefix(self, topic: str, partition: int) -> str:
        return f"shard-{topic}-p{partition}-"

    def _load_partition(self, topic: str, partition: int) -> None:
        """Dedup keys and the durable offset of one partition, from its manifests (also those other
        replicas wrote while they owned it)."""
        key = (topic, partition)
        keys: set[tuple[str, str]] = set()
        durable = -1
        for manifest in self.dir.glob(f"{self._prefix(topic, partition)}*.manifest.json"):
            body = json.loads(manifest.read_text())
            keys.update(tuple(k) for k in body.get("dedup_keys", []))
            for o in body["offsets"]:
                if o["topic"] == topic and o["partition"] == partition:
                    durable = max(durable, o["last"])
        self.keys[key] = keys
        self.durable[key] = durable

    def manifests(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.dir.glob("shard-*.manifest.json"))]

    def unannounced(self) -> list[ShardInfo]:
        """Shards written but whose ShardReady was not recorded as published (crash in between)."""
        out = []
        for manifest in sorted(self.dir.glob("shard-*.manifest.json")):
            marker = manifest.with_name(manifest.name.removesuffix(".manifest.json") + ".announced")
            if not marker.exists():
                out.append(ShardInfo.from_manifest(json.loads(manifest.read_text())))
        return out

    def mark_announced(self, shard_id: str) -> None:
        marker = self.dir / f"{_safe_name(shard_id, 'shard id')}.announced"
        write_atomic(marker, lambda p: p.write_text(datetime.now(timezone.utc).isoformat()))

    # -- rows ------------------------------------------------------------------------------------
    def committed_through(self, topic: str, partition: int) -> int | None:
        key = (topic, partition)
        if key not in self.durable:
            self._load_partition(topic, partition)
        durable = self.durable[key]
        return None if durable < 0 else durable

    def add(self, row: dict, topic: str, partition: int, offset: int) -> bool:
        """Buffer a row; False when its (prompt id, teacher revision) is already in the dataset or
        the buffer (the offset still counts as covered)."""
        key = (topic, partition)
        if key not in self.keys:
            self._load_partition(topic, partition)
        buffer = self.buffers.get(key)
        if buffer is None:
            buffer = self.buffers[key] = _Buffer(topic, partition, offset, offset, self.clock())
        buffer.first, buffer.last = min(buffer.first, offset), max(buffer.last, offset)
        dedup = (row["prompt_id"], row["teacher_revision"])
        if dedup in self.keys[key]:
            self.deduplicated += 1
            return False
        self.keys[key].add(dedup)
        buffer.rows.append(row)
        buffer.bytes += self._estimate(row)
        return True

    @staticmethod
    def _estimate(row: dict) -> int:
        return (200 + len(row["prompt"]) + len(row["completion"]) + 8 * len(row["topk_ids"])
                + 4 * (len(row["prompt_token_ids"]) + len(row["completion_token_ids"])))

    def held(self) -> dict[tuple[str, int], int]:
        """Lowest buffered offset per partition: offsets at or after it are not durable yet."""
        return {key: buffer.first for key, buffer in self.buffers.items()}

    # -- closing shards --------------------------------------------------------------------------
    def flush_due(self, now: float | None = None) -> list[ShardInfo]:
        now = self.clock() if now is None else now
        due = [key for key, b in self.buffers.items()
               if len(b.rows) >= self.max_rows or b.bytes >= self.max_bytes or now - b.started >= self.max_age_s]
        return [info for key in due if (info := self._close(key)) is not None]

    def flush_partition(self, topic: str, partition: int) -> list[ShardInfo]:
        info = self._close((topic, partition)) if (topic, partition) in self.buffers else None
        self.keys.pop((topic, partition), None)  # another replica may own it next: reload then
        self.durable.pop((topic, partition), None)
        return [info] if info else []

    def flush_all(self) -> list[ShardInfo]:
        return [info for key in list(self.buffers) if (info := self._close(key)) is not None]

    def _close(self, key: tuple[str, int]) -> ShardInfo | None:
        buffer = self.buffers.pop(key)
        if not buffer.rows:  # only duplicates: nothing to write, the offsets are covered anyway
            self.durable[key] = max(self.durable.get(key, -1), buffer.last)
            return None
        return self._write(buffer)

    def _write(self, buffer: _Buffer) -> ShardInfo:
        started = time.monotonic()
        topic, partition = buffer.topic, buffer.partition
        shard_id = f"{self._prefix(topic, partition)}{buffer.first:012d}-{buffer.last:012d}"
        path = self.dir / f"{shard_id}.parquet"
        table = rows_to_table(buffer.rows)
        write_atomic(path, lambda p: pq.write_table(table, p, compression="zstd"))
        teachers = {}
        for row in buffer.rows:
            ident = {field_: row[col] for col, field_ in TEACHER_FIELDS.items() if row.get(col) not in (None, "")}
            teachers[(row["teacher_model"], row["teacher_revision"])] = ident
        info = ShardInfo(
            shard_id=shard_id,
            dataset=self.dataset,
            uri=path.as_uri(),
            manifest_uri=self._manifest_path(path).as_uri(),
            sha256=sha256_file(path),
            bytes=path.stat().st_size,
            record_count=table.num_rows,
            token_count=sum(len(r["completion_token_ids"]) for r in buffer.rows),
            offsets=[{"topic": topic, "partition": partition, "first": buffer.first, "last": buffer.last}],
            teachers=list(teachers.values()),
            created_at=datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
        )
        body = info.__dict__ | {"writer": self.writer_id,
                                "dedup_keys": [[r["prompt_id"], r["teacher_revision"]] for r in buffer.rows]}
        manifest = self._manifest_path(path)
        write_atomic(manifest, lambda p: p.write_text(json.dumps(body)))
        self.durable[(topic, partition)] = max(self.durable.get((topic, partition), -1), buffer.last)
        log.info("shard_written", shard_id=shard_id, rows=info.record_count, bytes=info.bytes,
                 seconds=round(time.monotonic() - started, 3), partition=partition,
                 first_offset=buffer.first, last_offset=buffer.last)
        return info


def read_table(paths: list[Path]) -> pa.Table:
    """All rows of some shards as one table (the schema is the dataset's)."""
    return pa.concat_tables([pq.read_table(p, schema=SCHEMA) for p in paths]) if paths else SCHEMA.empty_table()
