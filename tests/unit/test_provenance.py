"""Provenance: the report is built from recorded lineage and matches the dataset; --verify catches a
modified shard; a teacher output without lineage is a dead letter."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from kafka.consumer.fetcher import ConsumerRecord

from distillery.v1 import teacher_output_pb2
from services.common import codec
from services.common.loop import DeadLetter
from services.sink.config import SinkSettings
from services.sink.shards import ShardWriter
from services.sink.stage import SinkStage
from services.stack.report import VerifyError, build_report, write_report
from tests.unit.test_shards import TOPIC, _row


@pytest.fixture
def dataset(tmp_path):
    writer = ShardWriter(tmp_path / "datasets", "default", max_rows=3)
    for i in range(7):
        row = _row(f"p{i}", i)
        if i % 2:
            row["source"], row["prompt_license"] = "web/forum", "cc-by-4.0"
        writer.add(row, TOPIC, 0, i)
    shards = writer.flush_due() + writer.flush_all()
    checkpoint = tmp_path / "runs" / "r" / "step-00000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / "lineage.json").write_text(json.dumps({
        "run_id": "r", "step": 10, "samples": 7,
        "shards": [{"shard_id": s.shard_id, "sha256": s.sha256, "uri": s.uri, "record_count": s.record_count}
                   for s in shards],
        "student": {"model_name": "s"}, "metrics": {"token_agreement": 0.5}}))
    return tmp_path, checkpoint, shards


def test_report_counts_equal_the_dataset(dataset):
    root, checkpoint, shards = dataset
    report = build_report(checkpoint, verify=True)
    rows = sum(pq.read_table(s.uri.removeprefix("file://")).num_rows for s in shards)
    assert report["rows"] == rows == 7
    assert report["verified"] is True and len(report["shards"]) == len(shards)
    sources = {s["source"]: s for s in report["prompt_sources"]}
    assert sources["web/forum"]["rows"] == 3 and sources["web/forum"]["licenses"] == ["cc-by-4.0"]
    assert sources["unit"]["rows"] == 4
    assert report["completion_tokens"] == 7 * 3
    [teacher] = report["teachers"]
    assert teacher["teacher_revision"] == "sha256:aa" and teacher["rows"] == 7
    path = write_report(checkpoint, dead_letters={"malformed-json": 2, "empty-prompt": 1})
    text = path.read_text()
    assert text.startswith("# Training-data summary") and "- malformed-json: 2" in text
    assert json.loads((checkpoint / "report.json").read_text())["dead_letters_by_reason"]["empty-prompt"] == 1
    assert "Not included" in write_report(checkpoint).read_text()
    whole = build_report(root)  # the whole data dir, from the manifests
    assert whole["rows"] == 7


def test_verify_detects_a_modified_shard(dataset):
    _, checkpoint, shards = dataset
    path = shards[0].uri.removeprefix("file://")
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"tampered")
    with pytest.raises(VerifyError, match=shards[0].shard_id):
        write_report(checkpoint, verify=True)


def test_teacher_output_without_lineage_is_a_dead_letter(tmp_path):
    stage = SinkStage(SinkSettings(data_dir=tmp_path), ShardWriter(tmp_path, "default"))
    output = teacher_output_pb2.TeacherOutput(prompt_id="x", completion="y")
    value, headers = codec.encode(output)
    record = ConsumerRecord(TOPIC, 0, None, 0, 0, 0, b"x", value, headers, None, len(value), 1, -1)
    with pytest.raises(DeadLetter) as err:
        stage.decode(record)
    assert err.value.reason == "lineage-missing" and "teacher.revision" in err.value.detail
