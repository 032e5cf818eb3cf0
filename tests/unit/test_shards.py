"""The sink's shard writer: close on rows/age/bytes, atomic files + manifest, dedup across restarts."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np
import pyarrow.parquet as pq
import pytest

from distillery.v1 import common_pb2, prompt_pb2, teacher_output_pb2
from services.common.dataset import row_from_output
from services.common.topk import pack
from services.sink.shards import ShardWriter, sha256_file

TOPIC = "distill.teacher-outputs"


def _row(prompt_id: str, offset: int, revision: str = "sha256:aa", partition: int = 0) -> dict:
    rng = np.random.default_rng(offset)
    out = teacher_output_pb2.TeacherOutput(
        prompt_id=prompt_id,
        prompt=prompt_pb2.Prompt(id=prompt_id, text=f"reverse: {prompt_id} =", source="unit"),
        completion=" x y",
        prompt_token_ids=[1, 2, 3],
        completion_token_ids=[4, 5, 2],
        topk=pack(rng.integers(0, 100, (3, 20)), -rng.random((3, 20)), 1.0),
        teacher=common_pb2.TeacherIdentity(model_name="t", revision=revision, tokenizer_hash="sha256:tt",
                                           vocab_size=100, triton_version="2.51.0"),
        lineage=common_pb2.Lineage(source="unit"),
    )
    out.lineage.received_at.GetCurrentTime()
    out.lineage.generated_at.GetCurrentTime()
    return row_from_output(out, TOPIC, partition, offset, datetime.now(timezone.utc))


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_closes_on_rows_and_writes_a_loadable_shard_with_manifest(tmp_path):
    writer = ShardWriter(tmp_path, "ds", max_rows=5, max_age_s=1000)
    for i in range(5):
        assert writer.add(_row(f"p{i}", 10 + i), TOPIC, 0, 10 + i)
    assert writer.held() == {(TOPIC, 0): 10}
    [info] = writer.flush_due()
    assert writer.held() == {}
    path = tmp_path / "ds" / f"{info.shard_id}.parquet"
    assert info.shard_id == f"shard-{TOPIC}-p0-000000000010-000000000014"
    table = pq.read_table(path)
    assert table.num_rows == 5 and sorted(table.column("prompt_id").to_pylist()) == [f"p{i}" for i in range(5)]
    manifest = json.loads((tmp_path / "ds" / f"{info.shard_id}.manifest.json").read_text())
    assert manifest["sha256"] == sha256_file(path) == info.sha256
    assert manifest["record_count"] == 5 and manifest["token_count"] == 15
    assert manifest["offsets"] == [{"topic": TOPIC, "partition": 0, "first": 10, "last": 14}]
    proto = info.to_proto()
    assert proto.record_count == 5 and proto.teachers[0].revision == "sha256:aa"
    import datasets

    assert len(datasets.load_dataset("parquet", data_files=[str(path)], split="train")) == 5
    assert not list((tmp_path / "ds").glob("*.tmp-*"))


def test_closes_on_age_and_on_bytes(tmp_path):
    clock = Clock()
    writer = ShardWriter(tmp_path, "ds", max_rows=1000, max_age_s=30, clock=clock)
    writer.add(_row("a", 0), TOPIC, 0, 0)
    clock.now = 29
    assert writer.flush_due() == []
    clock.now = 30.5
    assert len(writer.flush_due()) == 1
    small = ShardWriter(tmp_path, "ds2", max_rows=1000, max_bytes=1024, max_age_s=1000)
    small.add(_row("a", 0), TOPIC, 0, 0)
    small.add(_row("b", 1), TOPIC, 0, 1)
    assert len(small.flush_due()) == 1


def test_dedup_within_and_across_restarts(tmp_path):
    writer = ShardWriter(tmp_path, "ds", max_rows=100)
    assert writer.add(_row("a", 0), TOPIC, 0, 0)
    assert not writer.add(_row("a", 1), TOPIC, 0, 1), "same prompt, same teacher revision"
    assert writer.add(_row("a", 2, revision="sha256:bb"), TOPIC, 0, 2), "another teacher revision is a new row"
    writer.flush_all()
    again = ShardWriter(tmp_path, "ds", max_rows=100)
    assert again.committed_through(TOPIC, 0) == 2
    assert not again.add(_row("a", 3), TOPIC, 0, 3)
    assert again.add(_row("c", 4), TOPIC, 0, 4)
    again.flush_all()
    rows = [r for p in sorted((tmp_path / "ds").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert sorted((r["prompt_id"], r["teacher_revision"]) for r in rows) == [
        ("a", "sha256:aa"), ("a", "sha256:bb"), ("c", "sha256:aa")]


def test_only_duplicates_write_nothing_but_release_offsets(tmp_path):
    writer = ShardWriter(tmp_path, "ds")
    writer.add(_row("a", 0), TOPIC, 0, 0)
    writer.flush_all()
    writer.add(_row("a", 1), TOPIC, 0, 1)
    assert writer.held() == {(TOPIC, 0): 1}
    assert writer.flush_all() == []
    assert writer.held() == {} and writer.committed_through(TOPIC, 0) == 1


def test_crash_leftovers_are_cleaned_and_rewrites_replace(tmp_path):
    writer = ShardWriter(tmp_path, "ds")
    writer.add(_row("a", 0), TOPIC, 0, 0)
    [info] = writer.flush_all()
    folder = tmp_path / "ds"
    (folder / "shard-x.parquet.tmp-123").write_bytes(b"partial")
    # a shard renamed into place but whose manifest was never written: offsets never committed
    orphan = folder / f"shard-{TOPIC}-p1-000000000000-000000000000.parquet"
    orphan.write_bytes((folder / f"{info.shard_id}.parquet").read_bytes())
    restarted = ShardWriter(tmp_path, "ds")
    assert not orphan.exists() and not list(folder.glob("*.tmp-*"))
    assert [s.shard_id for s in restarted.unannounced()] == [info.shard_id]
    restarted.mark_announced(info.shard_id)
    assert restarted.unannounced() == []
    assert restarted.add(_row("b", 0, partition=1), TOPIC, 1, 0), "the orphan's row is written again"


def test_names_cannot_escape_the_root(tmp_path):
    for bad in ("../x", "/abs", "a/b", ".."):
        with pytest.raises(ValueError):
            ShardWriter(tmp_path, bad)
