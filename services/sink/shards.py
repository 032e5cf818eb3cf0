"""Parquet shards of the dataset: buffered per input partition, closed on rows, bytes or age, written
atomically, described by a JSON manifest, dedup'd on (prompt id, teacher revision).

Layout under `<root>/<dataset>/`:

    shard-<topic>-p<partition>-<first offset:012>-<last offset:012>.parquet   the rows (zstd)
    <same stem>.manifest.json      shard id, uri, sha256, counts, offsets, teachers, dedup keys
    <same stem>.announced          the ShardReady of this shard was published

Why one buffer per input partition: a shard then covers one contiguous offset range of one
partition, so its name is a function of what it covers (a rewrite after a crash lands on the same
name instead of beside it), and "every offset of partition P up to X is durable" is a fact the
consumer loop can commit (`held()`, `committed_through()`). A buffer mixing partitions would need a
name made of several ranges and would hold back the commits of all of them until it closes.
Teacher outputs are keyed by prompt id, so the copies of one output land in one partition; the
dedup set is still kept for the whole dataset (all manifests), so that a change of the partition
count, or a replica taking over a partition, cannot let a duplicate in.

Crash safety, in write order: Parquet to `<name>.tmp-<pid>`, fsync, rename, fsync the folder; then
the manifest the same way; offsets are committed by the loop only after that. A shard is part of
the dataset only once its manifest exists. What a crash can leave behind, and what happens to it:
- a temporary file: deleted;
- a shard without a manifest (crash between the two renames): deleted. Its offsets were never
  committed, so they are consumed and written again, possibly closing at another offset (size and
  age differ on replay), so the deletion, not the deterministic name, is what prevents a duplicate;
- a manifest without its `.announced` marker (crash before ShardReady was published and flushed):
  listed by `unannounced()` so the stage announces it again (the trainer dedups on shard id).
Several sink replicas may share the folder. Leftovers of one partition are removed when this
writer takes the partition (first `add`/`committed_through` after start or after a revoke): Kafka
gives a partition to one consumer at a time, and the previous owner flushed it on revoke. At start,
leftovers of every partition are removed once they are older than `leftover_grace_s` (a write in
flight in another replica takes well under a second).

Dedup keys live in the manifest, grouped by teacher revision (`{"revision": [prompt ids]}`): one
atomic file carries the shard's description and its keys, no sidecar can disagree with it, and the
index is rebuilt at start from JSON without opening any Parquet file (measured for a 5000-row shard:
the manifest is 136 kB and parses in 0.2 ms; reading the two key columns back from the Parquet
file takes 2 ms).

Rows are turned into Arrow record batches every `_CHUNK` rows while they are buffered: Arrow holds a
token id or log-prob in 4 bytes where a Python list holds it in ~32 (memory), and the conversion
cost is spread over `add()` instead of stalling the poll loop when a shard closes. Rows are type-
and range-checked in `add()` (every value a TeacherOutput can carry), so a bad row is refused on
its own (ValueError, for the stage to dead-letter) instead of failing the conversion of its chunk.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from google.protobuf import json_format

from distillery.v1 import common_pb2, dataset_pb2
from services.common.dataset import SCHEMA, SCHEMA_VERSION, rows_to_table
from services.common.files import sha256_file, write_atomic
from services.common.logging import get_logger

__all__ = ["ShardInfo", "ShardWriter", "sha256_file", "parse_shard_name"]

log = get_logger(__name__)

PartitionKey = tuple[str, int]

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# shard-<topic>-p<partition>-<first>-<last> followed by the file kind; the topic is greedy, the
# tail is anchored, so a topic that itself contains "-p1-" still parses to the right partition.
_NAME = re.compile(
    r"^shard-(?P<topic>.+)-p(?P<partition>\d+)-(?P<first>\d+)-(?P<last>\d+)"
    r"(?P<kind>\.parquet|\.manifest\.json|\.announced)(?P<tmp>\.tmp-.+)?$"
)
_CHUNK = 256  # rows buffered as Python dicts before they become one Arrow record batch
_LOGPROBS = "topk_logprobs.list.element"
# Parquet encodings: dictionary for everything (ids, repeated strings) except the float log-probs,
# which compress better byte-stream-split (float16 values widened to float32; -4% size, 2x faster
# writes than dictionary, measured at k=20). Both are standard Parquet, read by pyarrow/datasets.
_DICTIONARY = [f"{f.name}.list.element" if pa.types.is_list(f.type) else f.name for f in SCHEMA]
_DICTIONARY.remove(_LOGPROBS)
TEACHER_FIELDS = {
    "teacher_model": "model_name", "teacher_version": "model_version", "teacher_revision": "revision",
    "teacher_tokenizer_hash": "tokenizer_hash", "teacher_vocab_size": "vocab_size",
    "triton_version": "triton_version", "teacher_license": "license",
    "distillation_permitted": "distillation_permitted", "policy_override": "policy_override",
    "teacher_owner": "owner",
}


def _safe_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _SAFE.match(value) or ".." in value:
        raise ValueError(f"{what} {value!r} must be a plain name (letters, digits, '.', '_', '-')")
    return value


def parse_shard_name(name: str) -> dict | None:
    """{topic, partition, first, last, kind, tmp} of a file name of this layout, None otherwise."""
    match = _NAME.match(name)
    if not match:
        return None
    parts = match.groupdict()
    return {"topic": parts["topic"], "partition": int(parts["partition"]), "first": int(parts["first"]),
            "last": int(parts["last"]), "kind": parts["kind"], "tmp": parts["tmp"] is not None}


# -- row checks ---------------------------------------------------------------------------------
def _bounds(data_type: pa.DataType) -> tuple[int, int]:
    return -(1 << (data_type.bit_width - 1)), (1 << (data_type.bit_width - 1)) - 1


def _kinds() -> dict[str, list]:
    kinds: dict[str, list] = {"int": [], "int_list": [], "list": [], "float": [], "bool": [], "str": [], "time": []}
    for f in SCHEMA:
        t = f.type
        if pa.types.is_list(t) and pa.types.is_integer(t.value_type):
            kinds["int_list"].append((f.name, *_bounds(t.value_type)))
        elif pa.types.is_list(t):
            kinds["list"].append(f.name)
        elif pa.types.is_integer(t):
            kinds["int"].append((f.name, *_bounds(t)))
        elif pa.types.is_floating(t):
            kinds["float"].append(f.name)
        elif pa.types.is_boolean(t):
            kinds["bool"].append(f.name)
        elif pa.types.is_string(t):
            kinds["str"].append(f.name)
        elif pa.types.is_timestamp(t):
            kinds["time"].append(f.name)
        else:
            raise TypeError(f"no check for column {f.name} of {t}")  # a new column type: add its check
    return kinds


_KINDS = _kinds()


def _check_row(row: dict) -> None:
    """ValueError naming the first column whose value would not fit the dataset schema: checked
    here so that one bad row is refused alone rather than failing the Arrow conversion of many."""
    def bad(name: str, why: str):
        return ValueError(f"column {name} {why}, does not fit {SCHEMA.field(name).type}")

    for column in ("prompt_id", "teacher_revision"):
        if not isinstance(row.get(column), str) or not row[column]:
            raise ValueError(f"row needs a non-empty {column}")
    get = row.get
    for name, low, high in _KINDS["int"]:
        v = get(name)
        if v is not None and (type(v) is not int or not low <= v <= high):
            raise bad(name, f"is {v!r}")
    for name, low, high in _KINDS["int_list"]:
        v = get(name)
        if v is None:
            continue
        if type(v) is not list:
            raise bad(name, f"is a {type(v).__name__}")
        try:
            if v and (min(v) < low or max(v) > high):
                raise bad(name, "holds a value out of range")
        except TypeError:
            raise bad(name, "holds a value that is not an integer") from None
    for name in _KINDS["list"]:
        if get(name) is not None and type(get(name)) is not list:
            raise bad(name, f"is a {type(get(name)).__name__}")
    for name in _KINDS["float"]:
        v = get(name)
        if v is not None and type(v) is not float and not (type(v) is int and -(1 << 63) <= v < (1 << 63)):
            raise bad(name, f"is {v!r}")
    for name in _KINDS["bool"]:
        if get(name) is not None and type(get(name)) is not bool:
            raise bad(name, f"is {get(name)!r}")
    for name in _KINDS["str"]:
        v = get(name)
        if v is None:
            continue
        if type(v) is not str:
            raise bad(name, f"is a {type(v).__name__}")
        if not v.isascii():
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise bad(name, "is not valid UTF-8 (a lone surrogate)") from None
    for name in _KINDS["time"]:
        if get(name) is not None and not isinstance(get(name), datetime):
            raise bad(name, f"is {get(name)!r}")
    k, ids, logprobs = get("topk_k") or 0, get("topk_ids") or (), get("topk_logprobs") or ()
    if len(ids) != len(logprobs) or (k and len(ids) % k):
        raise ValueError(f"top-k sizes do not match: {len(ids)} ids, {len(logprobs)} log-probs, k={k}")


def _estimate(row: dict) -> int:
    """Arrow bytes of a row, roughly (fixed-width columns, offsets, the strings and the lists)."""
    return (180 + len(row["prompt"] or "") + len(row["completion"] or "") + len(row.get("metadata") or "")
            + 4 * (len(row["prompt_token_ids"] or ()) + len(row["completion_token_ids"] or ())
                   + len(row["topk_ids"] or ()) + len(row["topk_logprobs"] or ())))


# -- the shard description --------------------------------------------------------------------
@dataclass
class ShardInfo:
    """What a manifest says about its shard, and what ShardReady carries."""

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


def _manifest_keys(body: dict) -> dict[str, list[str]]:
    keys = body.get("dedup_keys", {})
    if isinstance(keys, list):  # the first format: [[prompt id, revision], ...]
        grouped: dict[str, list[str]] = {}
        for prompt_id, revision in keys:
            grouped.setdefault(revision, []).append(prompt_id)
        return grouped
    return keys


# -- buffers ---------------------------------------------------------------------------------
@dataclass
class _Buffer:
    topic: str
    partition: int
    first: int
    last: int
    started: float
    rows: int = 0
    bytes: int = 0
    tokens: int = 0
    pending: list[dict] = field(default_factory=list)
    batches: list[pa.RecordBatch] = field(default_factory=list)
    keys: dict[str, list[str]] = field(default_factory=dict)
    teachers: dict[tuple, dict] = field(default_factory=dict)

    def seal(self) -> None:
        """Pending rows into one Arrow batch (replacing the estimate by the exact size)."""
        if self.pending:
            batch = rows_to_table(self.pending).combine_chunks().to_batches()[0]
            self.bytes += batch.nbytes - sum(_estimate(r) for r in self.pending)
            self.batches.append(batch)
            self.pending = []

    def table(self) -> pa.Table:
        self.seal()
        return pa.Table.from_batches(self.batches, schema=SCHEMA)


class ShardWriter:
    """Turns rows of teacher outputs into shards of `root/<dataset>/`; see the module docstring."""

    def __init__(self, root: Path, dataset: str, writer_id: str = "", max_rows: int = 5000,
                 max_bytes: int = 64 * 1024 * 1024, max_age_s: float = 30.0, clock=time.monotonic,
                 leftover_grace_s: float = 300.0):
        self.dataset = _safe_name(dataset, "dataset name")
        root = Path(root).resolve()
        self.dir = (root / self.dataset).resolve()
        if not self.dir.is_relative_to(root) or self.dir == root:
            raise ValueError(f"dataset {dataset!r} resolves outside {root}")
        self.dir.mkdir(parents=True, exist_ok=True)
        if max_rows < 1 or max_bytes < 1 or max_age_s <= 0:
            raise ValueError("max_rows, max_bytes and max_age_s must be positive")
        self.writer_id = writer_id
        self.max_rows, self.max_bytes, self.max_age_s = max_rows, max_bytes, max_age_s
        self.clock = clock
        self.leftover_grace_s = leftover_grace_s
        self.buffers: dict[PartitionKey, _Buffer] = {}
        self.deduplicated = 0
        self.rows_written = 0
        # (prompt ids by teacher revision) of the whole dataset and of the open buffers
        self._keys: dict[str, set[str]] = {}
        self._durable: dict[PartitionKey, int] = {}  # highest offset covered by a manifest (or dedup)
        self._loaded: set[str] = set()  # manifest names already in _keys/_durable
        self._claimed: set[PartitionKey] = set()
        started = time.monotonic()
        self._remove_leftovers(older_than_s=leftover_grace_s)
        self._refresh()
        log.info("shard_writer_started", dataset=self.dataset, dir=str(self.dir), manifests=len(self._loaded),
                 keys=sum(len(v) for v in self._keys.values()), seconds=round(time.monotonic() - started, 3))

    # -- start-up, partitions taken over ---------------------------------------------------------
    def _manifest_path(self, shard_id: str) -> Path:
        return self.dir / f"{shard_id}.manifest.json"

    def _remove_leftovers(self, older_than_s: float | None = None, partition: PartitionKey | None = None) -> None:
        """Temporary files, and shards without a manifest, of one partition or (old enough) of all."""
        now = time.time()
        for path in self.dir.iterdir():
            parsed = parse_shard_name(path.name)
            if partition is not None and (parsed is None or (parsed["topic"], parsed["partition"]) != partition):
                continue  # another partition's file, or not a shard's
            temporary = ".tmp-" in path.name
            orphan = (parsed is not None and not temporary and parsed["kind"] == ".parquet"
                      and not path.with_name(path.name.removesuffix(".parquet") + ".manifest.json").exists())
            if not (temporary or orphan):
                continue
            try:
                if older_than_s is not None and now - path.stat().st_mtime < older_than_s:
                    continue  # may be another replica's write in flight
                path.unlink()
            except FileNotFoundError:
                continue  # its writer renamed or removed it meanwhile
            log.warning("leftover_removed", path=str(path), kind="temporary" if temporary else "shard-without-manifest")

    def _refresh(self) -> None:
        """Load the manifests not seen yet (written before start, or by other replicas since)."""
        for manifest in sorted(self.dir.glob("shard-*.manifest.json")):
            if manifest.name in self._loaded:
                continue
            try:
                body = json.loads(manifest.read_text())
                keys, offsets = _manifest_keys(body), [(o["topic"], o["partition"], o["last"]) for o in body["offsets"]]
            except FileNotFoundError:
                continue
            except (ValueError, KeyError, TypeError) as exc:
                # manifests are written atomically: this one was edited by hand or the disk is bad.
                # Going on without it could let duplicates in; stop and say which file.
                raise ValueError(f"unreadable shard manifest {manifest}: {exc!r}") from exc
            self._loaded.add(manifest.name)
            for revision, prompt_ids in keys.items():
                self._keys.setdefault(sys.intern(revision), set()).update(prompt_ids)
            for topic, partition, last in offsets:
                self._durable[(topic, partition)] = max(self._durable.get((topic, partition), -1), last)

    def _claim(self, topic: str, partition: int) -> PartitionKey:
        key = (_safe_name(topic, "topic"), partition)
        if key not in self._claimed:
            if not isinstance(partition, int) or isinstance(partition, bool) or partition < 0:
                raise ValueError(f"partition {partition!r} must be a non-negative integer")
            self._remove_leftovers(partition=key)
            self._refresh()
            self._claimed.add(key)
        return key

    # -- announcements ---------------------------------------------------------------------------
    def manifests(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.dir.glob("shard-*.manifest.json"))]

    def unannounced(self) -> list[ShardInfo]:
        """Shards whose manifest exists but whose ShardReady was not marked published (crash in
        between), oldest offsets first within a partition."""
        out = []
        for manifest in sorted(self.dir.glob("shard-*.manifest.json")):
            stem = manifest.name.removesuffix(".manifest.json")
            if (self.dir / f"{stem}.announced").exists():
                continue
            if not (self.dir / f"{stem}.parquet").exists():
                log.error("shard_missing", manifest=str(manifest))  # removed by hand: nothing to announce
                continue
            out.append(ShardInfo.from_manifest(json.loads(manifest.read_text())))
        return out

    def mark_announced(self, shard_id: str) -> None:
        """Record that the ShardReady of `shard_id` was published (atomic, tiny)."""
        shard_id = _safe_name(shard_id, "shard id")
        if not self._manifest_path(shard_id).exists():
            raise ValueError(f"no manifest for shard {shard_id!r} in {self.dir}")
        marker = self.dir / f"{shard_id}.announced"
        write_atomic(marker, lambda p: p.write_text(datetime.now(timezone.utc).isoformat()))

    # -- rows ------------------------------------------------------------------------------------
    def committed_through(self, topic: str, partition: int) -> int | None:
        """Highest offset of the partition already durable (in a manifest, or dedup'd and closed):
        records at or below it are duplicates."""
        return self._durable.get(self._claim(topic, partition))

    def add(self, row: dict, topic: str, partition: int, offset: int) -> bool:
        """Buffer a row; False (and counted) when its (prompt id, teacher revision) is already in the
        dataset or a buffer, or its offset is already durable; the offset counts as covered either
        way. ValueError when the row does not fit the dataset schema (nothing is buffered then)."""
        key = self._claim(topic, partition)
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset {offset!r} must be a non-negative integer")
        if offset <= self._durable.get(key, -1):
            self.deduplicated += 1
            return False
        prompt_id, revision = row.get("prompt_id"), row.get("teacher_revision")
        duplicate = isinstance(revision, str) and prompt_id in self._keys.get(revision, ())
        if not duplicate:
            _check_row(row)
        buffer = self.buffers.get(key)
        if buffer is None:
            buffer = self.buffers[key] = _Buffer(topic, partition, offset, offset, self.clock())
        buffer.first, buffer.last = min(buffer.first, offset), max(buffer.last, offset)
        if duplicate:
            self.deduplicated += 1
            return False
        revision = sys.intern(revision)
        self._keys.setdefault(revision, set()).add(prompt_id)
        buffer.keys.setdefault(revision, []).append(prompt_id)
        teacher = tuple(row.get(column) for column in TEACHER_FIELDS)
        if teacher not in buffer.teachers:
            buffer.teachers[teacher] = {name: value for name, value in zip(TEACHER_FIELDS.values(), teacher)
                                        if value not in (None, "")}
        buffer.tokens += len(row["completion_token_ids"] or ())
        buffer.rows += 1
        buffer.bytes += _estimate(row)
        buffer.pending.append(row)
        if len(buffer.pending) >= _CHUNK:
            buffer.seal()
        return True

    def held(self) -> dict[PartitionKey, int]:
        """Lowest buffered offset per partition: offsets at or after it are not durable yet."""
        return {key: buffer.first for key, buffer in self.buffers.items()}

    # -- closing shards --------------------------------------------------------------------------
    def due(self, now: float | None = None) -> list[PartitionKey]:
        """Partitions whose buffer is full (rows, bytes) or old (age since its first record)."""
        now = self.clock() if now is None else now
        return [key for key, b in self.buffers.items()
                if b.rows >= self.max_rows or b.bytes >= self.max_bytes or now - b.started >= self.max_age_s]

    def flush_due(self, now: float | None = None) -> list[ShardInfo]:
        return [info for key in self.due(now) if (info := self._close(key)) is not None]

    def flush_partition(self, topic: str, partition: int) -> list[ShardInfo]:
        """Close the partition's buffer (it is being revoked)."""
        key = (topic, partition)
        info = self._close(key) if key in self.buffers else None
        self._claimed.discard(key)  # taken again later: its leftovers are cleaned, new manifests read
        return [info] if info else []

    def flush_all(self) -> list[ShardInfo]:
        return [info for key in list(self.buffers) if (info := self._close(key)) is not None]

    def _close(self, key: PartitionKey) -> ShardInfo | None:
        buffer = self.buffers[key]
        # a failed write raises and leaves the buffer (and its hold on the offsets) in place
        info = self._write(buffer) if buffer.rows else None  # only duplicates: nothing to write
        del self.buffers[key]
        self._durable[key] = max(self._durable.get(key, -1), buffer.last)
        return info

    def _write(self, buffer: _Buffer) -> ShardInfo:
        started = time.monotonic()
        shard_id = f"shard-{buffer.topic}-p{buffer.partition}-{buffer.first:012d}-{buffer.last:012d}"
        path = self.dir / f"{shard_id}.parquet"
        manifest = self._manifest_path(shard_id)
        table = buffer.table()
        write_atomic(path, lambda p: pq.write_table(table, p, compression="zstd", use_dictionary=_DICTIONARY,
                                                    use_byte_stream_split=[_LOGPROBS]))
        info = ShardInfo(
            shard_id=shard_id,
            dataset=self.dataset,
            uri=path.as_uri(),
            manifest_uri=manifest.as_uri(),
            sha256=sha256_file(path),
            bytes=path.stat().st_size,
            record_count=table.num_rows,
            token_count=buffer.tokens,
            offsets=[{"topic": buffer.topic, "partition": buffer.partition, "first": buffer.first,
                      "last": buffer.last}],
            teachers=list(buffer.teachers.values()),
            created_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        )
        body = asdict(info) | {"writer": self.writer_id, "dedup_keys": buffer.keys}
        write_atomic(manifest, lambda p: p.write_text(json.dumps(body, separators=(",", ":"))))
        self._loaded.add(manifest.name)
        self.rows_written += info.record_count
        log.info("shard_written", shard_id=shard_id, rows=info.record_count, bytes=info.bytes,
                 seconds=round(time.monotonic() - started, 3), topic=buffer.topic, partition=buffer.partition,
                 first_offset=buffer.first, last_offset=buffer.last, pid=os.getpid())
        return info
