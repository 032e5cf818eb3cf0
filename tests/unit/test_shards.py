"""The sink's shard writer: shards close on rows/bytes/age, files and manifests are atomic and
checkable, dedup holds across restarts and crashes, offsets are held until durable."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone

import numpy as np
import pyarrow.parquet as pq
import pytest

from distillery.v1 import common_pb2, prompt_pb2, teacher_output_pb2
from services.common.dataset import SCHEMA_VERSION, row_from_output, rows_to_table
from services.common.topk import pack
from services.sink import shards as shards_module
from services.sink.shards import ShardInfo, ShardWriter, parse_shard_name, sha256_file

TOPIC = "distill.teacher-outputs"
REV_A = "sha256:aa"  # tests/unit/test_provenance.py imports _row and relies on this default
REV_B = "sha256:bb"


def _output(prompt_id: str, rng_seed: int, revision: str = REV_A, tokens: int = 3, k: int = 20,
            **params) -> teacher_output_pb2.TeacherOutput:
    rng = np.random.default_rng(rng_seed)
    out = teacher_output_pb2.TeacherOutput(
        prompt_id=prompt_id,
        prompt=prompt_pb2.Prompt(id=prompt_id, text=f"reverse: {prompt_id} =", source="unit"),
        completion=" x y",
        prompt_token_ids=[1, 2, 3],
        completion_token_ids=rng.integers(0, 100, tokens).tolist(),
        topk=pack(rng.integers(0, 100, (tokens, k)), -rng.random((tokens, k)), 1.0),
        finish_reason=teacher_output_pb2.FINISH_REASON_LENGTH,
        teacher=common_pb2.TeacherIdentity(model_name="t", model_version="1", revision=revision,
                                           tokenizer_hash="sha256:tt", vocab_size=100, triton_version="2.51.0"),
        params=common_pb2.GenerationParams(max_new_tokens=tokens, **params),
        lineage=common_pb2.Lineage(source="unit"),
    )
    out.lineage.received_at.GetCurrentTime()
    out.lineage.generated_at.GetCurrentTime()
    return out


def _row(prompt_id: str, offset: int, revision: str = REV_A, partition: int = 0, **kw) -> dict:
    return row_from_output(_output(prompt_id, offset, revision, **kw), TOPIC, partition, offset,
                           datetime.now(timezone.utc))


def _dataset_rows(folder) -> list[dict]:
    return [r for p in sorted(folder.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_closes_on_rows_into_a_loadable_shard_with_a_matching_manifest(tmp_path):
    writer = ShardWriter(tmp_path, "ds", writer_id="w1", max_rows=5, max_age_s=1000)
    rows = [_row(f"p{i}", 10 + i) for i in range(5)]
    for i, row in enumerate(rows[:4]):
        assert writer.add(row, TOPIC, 0, 10 + i)
    assert writer.due() == [] and writer.flush_due() == []
    assert writer.add(rows[4], TOPIC, 0, 14)
    assert writer.due() == [(TOPIC, 0)]
    [info] = writer.flush_due()
    assert writer.held() == {} and writer.due() == []
    folder = tmp_path / "ds"
    path = folder / f"{info.shard_id}.parquet"
    assert info.shard_id == f"shard-{TOPIC}-p0-000000000010-000000000014"
    assert parse_shard_name(path.name) == {"topic": TOPIC, "partition": 0, "first": 10, "last": 14,
                                           "kind": ".parquet", "tmp": False}
    table = pq.read_table(path)
    assert table.equals(rows_to_table(rows)), "every column round-trips"
    assert table.schema.metadata[b"distillery.schema_version"] == str(SCHEMA_VERSION).encode()
    columns = pq.ParquetFile(path).metadata.row_group(0)
    assert {columns.column(i).compression for i in range(columns.num_columns)} == {"ZSTD"}
    logprobs = [columns.column(i) for i in range(columns.num_columns)
                if columns.column(i).path_in_schema == "topk_logprobs.list.element"]
    assert "BYTE_STREAM_SPLIT" in logprobs[0].encodings
    manifest = json.loads((folder / f"{info.shard_id}.manifest.json").read_text())
    assert manifest["sha256"] == sha256_file(path) == info.sha256
    assert manifest["bytes"] == path.stat().st_size == info.bytes
    assert manifest["uri"] == path.resolve().as_uri() and manifest["dataset"] == "ds" and manifest["writer"] == "w1"
    assert manifest["record_count"] == 5
    assert manifest["token_count"] == sum(len(r["completion_token_ids"]) for r in rows) == 15
    assert manifest["offsets"] == [{"topic": TOPIC, "partition": 0, "first": 10, "last": 14}]
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["dedup_keys"] == {REV_A: [f"p{i}" for i in range(5)]}
    assert manifest["teachers"] == [{"model_name": "t", "model_version": "1", "revision": REV_A,
                                     "tokenizer_hash": "sha256:tt", "vocab_size": 100, "triton_version": "2.51.0",
                                     "distillation_permitted": False, "policy_override": False}]
    assert ShardInfo.from_manifest(manifest) == info
    proto = info.to_proto()
    assert (proto.shard_id, proto.record_count, proto.bytes, proto.sha256, proto.token_count) == (
        info.shard_id, 5, info.bytes, info.sha256, 15)
    assert [(o.topic, o.partition, o.first, o.last) for o in proto.offsets] == [(TOPIC, 0, 10, 14)]
    assert [t.revision for t in proto.teachers] == [REV_A] and proto.teachers[0].vocab_size == 100
    assert proto.schema_version == SCHEMA_VERSION and proto.created_at.seconds > 0
    assert proto.manifest_uri.endswith(".manifest.json")
    import datasets

    loaded = datasets.load_dataset("parquet", data_files=[str(path)], split="train",
                                   cache_dir=str(tmp_path / "hf-cache"))
    assert len(loaded) == 5 and loaded[0]["topk_k"] == 20 and len(loaded[0]["topk_logprobs"]) == 60
    assert not list(folder.glob("*.tmp-*"))


def test_many_rows_go_through_arrow_batches_unchanged(tmp_path):
    writer = ShardWriter(tmp_path, "ds", max_rows=10_000, max_age_s=1000)
    rows = [_row(f"p{i}", i, tokens=1 + i % 7) for i in range(700)]  # several internal chunks + a tail
    for i, row in enumerate(rows):
        assert writer.add(row, TOPIC, 0, i)
    [info] = writer.flush_all()
    assert pq.read_table(tmp_path / "ds" / f"{info.shard_id}.parquet").equals(rows_to_table(rows))
    assert info.token_count == sum(1 + i % 7 for i in range(700))


def test_closes_on_age_counted_from_the_first_record(tmp_path):
    clock = Clock()
    writer = ShardWriter(tmp_path, "ds", max_rows=1000, max_age_s=30, clock=clock)
    clock.now = 100.0
    writer.add(_row("a", 0), TOPIC, 0, 0)
    clock.now = 129.0
    writer.add(_row("b", 1), TOPIC, 0, 1)
    assert writer.due() == [] and writer.flush_due() == []
    clock.now = 130.0
    [info] = writer.flush_due()
    assert info.record_count == 2
    assert writer.flush_due(now=10_000.0) == [], "no buffer left"
    writer.add(_row("c", 2), TOPIC, 0, 2)
    assert writer.flush_due(now=130.0 + 29) == [] and len(writer.flush_due(now=130.0 + 30)) == 1


def test_closes_on_bytes(tmp_path):
    writer = ShardWriter(tmp_path, "ds", max_rows=1000, max_bytes=20_000, max_age_s=1000)
    added = 0
    while not writer.due():
        assert writer.add(_row(f"p{added}", added, tokens=16), TOPIC, 0, added)
        added += 1
        assert added < 100, "the byte estimate never reached max_bytes"
    assert added > 1, "one row of 16 tokens x k=20 is well under 20 kB"
    [info] = writer.flush_due()
    assert info.record_count == added


def test_dedup_within_buffers_and_across_restarts(tmp_path):
    writer = ShardWriter(tmp_path, "ds", max_rows=100)
    assert writer.add(_row("a", 0), TOPIC, 0, 0)
    assert not writer.add(_row("a", 1), TOPIC, 0, 1), "same prompt, same teacher revision"
    assert writer.add(_row("a", 2, revision=REV_B), TOPIC, 0, 2), "another teacher revision is a new row"
    assert not writer.add(_row("a", 3, partition=1), TOPIC, 1, 3), "a copy in another partition's buffer"
    assert writer.deduplicated == 2
    assert writer.held() == {(TOPIC, 0): 0, (TOPIC, 1): 3}
    assert [s.record_count for s in writer.flush_all()] == [2], "partition 1 held only a duplicate"
    assert writer.committed_through(TOPIC, 1) == 3

    again = ShardWriter(tmp_path, "ds", max_rows=100)
    assert again.committed_through(TOPIC, 0) == 2
    assert again.committed_through(TOPIC, 1) is None, "a dedup-only partition has no manifest"
    assert not again.add(_row("x", 1), TOPIC, 0, 1), "an offset already in a manifest is skipped"
    assert not again.add(_row("a", 3), TOPIC, 0, 3), "a key from an earlier run"
    assert not again.add(_row("a", 4, partition=2), TOPIC, 2, 4), "dedup spans partitions"
    assert again.add(_row("c", 5), TOPIC, 0, 5)
    again.flush_all()
    assert sorted((r["prompt_id"], r["teacher_revision"]) for r in _dataset_rows(tmp_path / "ds")) == [
        ("a", REV_A), ("a", REV_B), ("c", REV_A)]


def test_manifests_of_other_replicas_are_read_when_a_partition_is_taken(tmp_path):
    mine = ShardWriter(tmp_path, "ds")
    other = ShardWriter(tmp_path, "ds")
    other.add(_row("a", 7, partition=3), TOPIC, 3, 7)
    other.flush_all()
    assert not mine.add(_row("a", 8, partition=3), TOPIC, 3, 8), "partition 3 taken: the other's keys count"
    assert mine.committed_through(TOPIC, 3) == 7
    assert mine.flush_all() == [] and mine.committed_through(TOPIC, 3) == 8


def test_first_manifest_format_still_feeds_dedup(tmp_path):
    writer = ShardWriter(tmp_path, "ds")
    writer.add(_row("a", 0), TOPIC, 0, 0)
    [info] = writer.flush_all()
    manifest = tmp_path / "ds" / f"{info.shard_id}.manifest.json"
    body = json.loads(manifest.read_text())
    body["dedup_keys"] = [["a", REV_A]]
    manifest.write_text(json.dumps(body))
    assert not ShardWriter(tmp_path, "ds").add(_row("a", 5, partition=1), TOPIC, 1, 5)


def test_an_unreadable_manifest_stops_the_start_with_its_name(tmp_path):
    writer = ShardWriter(tmp_path, "ds")
    writer.add(_row("a", 0), TOPIC, 0, 0)
    [info] = writer.flush_all()
    (tmp_path / "ds" / f"{info.shard_id}.manifest.json").write_text('{"offsets": [')
    with pytest.raises(ValueError, match=info.shard_id):
        ShardWriter(tmp_path, "ds")


def test_a_buffer_of_duplicates_writes_nothing_but_releases_its_offsets(tmp_path):
    writer = ShardWriter(tmp_path, "ds")
    writer.add(_row("a", 0), TOPIC, 0, 0)
    writer.flush_all()
    assert not writer.add(_row("a", 1), TOPIC, 0, 1)
    assert not writer.add(_row("a", 2), TOPIC, 0, 2)
    assert writer.held() == {(TOPIC, 0): 1}
    assert writer.flush_all() == []
    assert writer.held() == {} and writer.committed_through(TOPIC, 0) == 2
    assert len(list((tmp_path / "ds").glob("*.parquet"))) == 1


def test_held_is_the_lowest_buffered_offset_per_partition(tmp_path):
    writer = ShardWriter(tmp_path, "ds")
    assert writer.held() == {}
    assert writer.add(_row("a", 4, partition=0), TOPIC, 0, 4)
    writer.add(_row("b", 5, partition=0), TOPIC, 0, 5)
    writer.add(_row("c", 9, partition=1), TOPIC, 1, 9)
    writer.add(_row("d", 3, partition=1), TOPIC, 1, 3)  # a rewind: the lower offset holds
    assert writer.held() == {(TOPIC, 0): 4, (TOPIC, 1): 3}
    [info] = writer.flush_partition(TOPIC, 1)
    assert info.offsets == [{"topic": TOPIC, "partition": 1, "first": 3, "last": 9}]
    written = pq.read_table(tmp_path / "ds" / f"{info.shard_id}.parquet")
    assert set(written.column("kafka_partition").to_pylist()) == {1}, "a shard holds one partition"
    assert writer.held() == {(TOPIC, 0): 4}
    assert writer.flush_partition(TOPIC, 7) == []


def test_a_failed_write_keeps_the_buffer_and_its_hold(tmp_path, monkeypatch):
    writer = ShardWriter(tmp_path, "ds")
    writer.add(_row("a", 0), TOPIC, 0, 0)

    def disk_full(path, write):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards_module, "write_atomic", disk_full)
    with pytest.raises(OSError):
        writer.flush_all()
    assert writer.held() == {(TOPIC, 0): 0}, "offsets must not be committed"
    monkeypatch.undo()
    [info] = writer.flush_all()
    assert info.record_count == 1 and writer.held() == {}


def test_crash_between_rename_and_manifest_leaves_no_duplicate(tmp_path, monkeypatch):
    folder = tmp_path / "ds"
    writer = ShardWriter(tmp_path, "ds", max_rows=5)
    for i in range(5):
        writer.add(_row(f"p{i}", i), TOPIC, 0, i)
    real = shards_module.write_atomic

    def crash_on_manifest(path, write):
        if path.name.endswith(".manifest.json"):
            raise SystemExit("killed between the renames")
        real(path, write)

    monkeypatch.setattr(shards_module, "write_atomic", crash_on_manifest)
    with pytest.raises(SystemExit):
        writer.flush_due()
    monkeypatch.undo()
    assert [p.name for p in folder.glob("*.parquet")] == [f"shard-{TOPIC}-p0-000000000000-000000000004.parquet"]
    assert not list(folder.glob("*.manifest.json"))

    # restart: nothing was committed, so offsets 0.. come again, and this time more of them
    restarted = ShardWriter(tmp_path, "ds", max_rows=7)
    assert restarted.committed_through(TOPIC, 0) is None
    assert restarted.unannounced() == []
    for i in range(7):
        assert restarted.add(_row(f"p{i}", i), TOPIC, 0, i), "the lost shard's keys are not in the index"
    [info] = restarted.flush_due()
    ids = [r["prompt_id"] for r in _dataset_rows(folder)]
    assert sorted(ids) == [f"p{i}" for i in range(7)], "no row twice in the dataset"
    assert [p.name for p in folder.glob("*.parquet")] == [f"{info.shard_id}.parquet"]


def test_a_rewrite_of_the_same_range_replaces_the_file(tmp_path):
    folder = tmp_path / "ds"
    writer = ShardWriter(tmp_path, "ds")
    writer.add(_row("a", 0), TOPIC, 0, 0)
    [first] = writer.flush_all()
    (folder / f"{first.shard_id}.manifest.json").unlink()  # as if the manifest never made it
    again = ShardWriter(tmp_path, "ds")
    again.add(_row("a", 0), TOPIC, 0, 0)
    [second] = again.flush_all()
    assert second.shard_id == first.shard_id
    assert len(_dataset_rows(folder)) == 1 and second.sha256 == sha256_file(folder / f"{second.shard_id}.parquet")


def test_leftovers_are_cleaned(tmp_path):
    folder = tmp_path / "ds"
    writer = ShardWriter(tmp_path, "ds")
    writer.add(_row("a", 0), TOPIC, 0, 0)
    [info] = writer.flush_all()
    shard_bytes = (folder / f"{info.shard_id}.parquet").read_bytes()
    stale_tmp = folder / f"shard-{TOPIC}-p5-000000000000-000000000003.parquet.tmp-123"
    stale_orphan = folder / f"shard-{TOPIC}-p6-000000000000-000000000000.parquet"
    fresh_tmp = folder / f"shard-{TOPIC}-p1-000000000000-000000000003.manifest.json.tmp-77"
    fresh_orphan = folder / f"shard-{TOPIC}-p1-000000000000-000000000000.parquet"
    other_tmp = folder / "notes.txt.tmp-9"
    unrelated = folder / "README.txt"
    for path in (stale_tmp, stale_orphan, fresh_tmp, fresh_orphan, other_tmp, unrelated):
        path.write_bytes(shard_bytes)
    hour_ago = time.time() - 3600
    for path in (stale_tmp, stale_orphan, other_tmp):
        os.utime(path, (hour_ago, hour_ago))

    restarted = ShardWriter(tmp_path, "ds", leftover_grace_s=300)
    assert not stale_tmp.exists() and not stale_orphan.exists() and not other_tmp.exists()
    assert fresh_tmp.exists() and fresh_orphan.exists(), "may be another replica's write in flight"
    assert unrelated.exists() and (folder / f"{info.shard_id}.parquet").exists()
    # taking partition 1 makes its leftovers ours: removed before anything is written
    assert restarted.committed_through(TOPIC, 1) is None
    assert not fresh_tmp.exists() and not fresh_orphan.exists()
    assert restarted.add(_row("b", 0, partition=1), TOPIC, 1, 0), "the orphan's row is written again"
    assert unrelated.exists()
    ShardWriter(tmp_path, "ds", leftover_grace_s=0)
    assert not list(folder.glob("*.tmp-*"))


def test_unannounced_until_marked(tmp_path):
    writer = ShardWriter(tmp_path, "ds")
    writer.add(_row("a", 0), TOPIC, 0, 0)
    writer.add(_row("b", 1, partition=1), TOPIC, 1, 1)
    infos = writer.flush_all()
    restarted = ShardWriter(tmp_path, "ds")
    assert restarted.unannounced() == sorted(infos, key=lambda i: i.shard_id)
    restarted.mark_announced(infos[0].shard_id)
    assert [i.shard_id for i in ShardWriter(tmp_path, "ds").unannounced()] == [infos[1].shard_id]
    assert not list((tmp_path / "ds").glob("*.tmp-*"))
    with pytest.raises(ValueError):
        restarted.mark_announced("shard-unknown-p0-000000000000-000000000000")


def test_a_row_that_does_not_fit_the_schema_is_refused_alone(tmp_path):
    writer = ShardWriter(tmp_path, "ds")
    bad = _row("big-seed", 0, seed=2**63 + 5)
    with pytest.raises(ValueError, match="seed"):
        writer.add(bad, TOPIC, 0, 0)
    assert writer.held() == {}, "nothing buffered"
    with pytest.raises(ValueError, match="teacher_revision"):
        writer.add(_row("no-revision", 1, revision=""), TOPIC, 0, 1)
    huge_ids = _row("huge-id", 2)
    huge_ids["topk_ids"][0] = 2**31
    with pytest.raises(ValueError, match="topk_ids"):
        writer.add(huge_ids, TOPIC, 0, 2)
    surrogate = _row("surrogate", 3)
    surrogate["completion"] = "ok \ud800"
    with pytest.raises(ValueError, match="completion"):
        writer.add(surrogate, TOPIC, 0, 3)
    mixed = _row("mixed", 4)
    mixed["prompt_token_ids"] = [1, "2"]
    with pytest.raises(ValueError, match="prompt_token_ids"):
        writer.add(mixed, TOPIC, 0, 4)
    assert writer.held() == {}, "nothing buffered"
    assert writer.add(_row("fine", 5), TOPIC, 0, 5)
    [info] = writer.flush_all()
    assert info.record_count == 1 and info.offsets[0]["first"] == 5


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/b", "..", ".hidden", "", "x/../../y"])
def test_dataset_names_cannot_escape_the_root(tmp_path, bad):
    with pytest.raises(ValueError):
        ShardWriter(tmp_path / "root", bad)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_other_names_cannot_escape_the_root(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "linked").symlink_to(outside)
    with pytest.raises(ValueError):
        ShardWriter(tmp_path / "root", "linked")
    writer = ShardWriter(tmp_path / "root", "ds")
    for topic in ("../x", "a/b", "/abs"):
        with pytest.raises(ValueError):
            writer.add(_row("a", 0), topic, 0, 0)
    with pytest.raises(ValueError):
        writer.add(_row("a", 0), TOPIC, -1, 0)
    for shard_id in ("../../x", "/abs", "a/../b"):
        with pytest.raises(ValueError):
            writer.mark_announced(shard_id)
    assert list(outside.iterdir()) == [] and writer.held() == {}
