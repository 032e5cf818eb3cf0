"""The trainer stage on a real tiny student: checks a shard (path, sha256, vocab), trains it, and
publishes CheckpointReady for every checkpoint, mid-shard ones included; a re-announced shard
is not trained again; a shard outside the datasets folder or with a wrong hash is a dead letter."""

from __future__ import annotations

import pyarrow.parquet as pq
from kafka.consumer.fetcher import ConsumerRecord

from distillery.v1 import checkpoint_pb2, dataset_pb2
from services.common import codec
from services.common.files import sha256_file
from services.common.loop import Failed, Output
from services.trainer.config import TrainerSettings
from services.trainer.stage import CheckpointBoard, make_stage
from tests.unit.test_trainer_core import _shard, models  # noqa: F401 - the fixture


def _record(shard: dataset_pb2.ShardReady, offset: int) -> ConsumerRecord:
    value, headers = codec.encode(shard)
    return ConsumerRecord("distill.shards", 0, None, offset, 0, 0, b"default", value, headers, None, len(value), 7, -1)


def test_trains_and_announces_every_checkpoint(models, tmp_path):  # noqa: F811
    teacher, student = models
    datasets = tmp_path / "datasets" / "default"
    datasets.mkdir(parents=True)
    path = datasets / "shard-a.parquet"
    pq.write_table(_shard(teacher, 24, 1), path)
    settings = TrainerSettings(data_dir=tmp_path, student_dir=student, run_id="r", batch_size=4,
                               checkpoint_every_steps=2, eval_fraction=0.2)
    stage = make_stage(settings, CheckpointBoard(), None)
    shard = dataset_pb2.ShardReady(shard_id="shard-a", uri=path.as_uri(), sha256=sha256_file(path), record_count=24)
    record = _record(shard, 0)
    results = stage.process([(record, stage.decode(record))])
    events = [codec.decode(r.value, r.headers, checkpoint_pb2.CheckpointReady) for r in results
              if isinstance(r, Output)]
    assert len(events) >= 2, "mid-shard checkpoints and the end-of-shard one are all announced"
    assert events[-1].shards[0].shard_id == "shard-a" and events[-1].step > events[0].step
    assert all(e.run_id == "r" for e in events)
    # the sink announces the same shard again after a crash: not trained twice, its event re-sent
    again = stage.process([(record, stage.decode(record))])
    assert [codec.decode(r.value, r.headers, checkpoint_pb2.CheckpointReady).step for r in again] == [events[-1].step]

    outside = dataset_pb2.ShardReady(shard_id="x", uri="file:///etc/passwd", sha256="00", record_count=1)
    corrupt = dataset_pb2.ShardReady(shard_id="y", uri=path.as_uri(), sha256="00" * 32, record_count=1)
    failed = stage.process([(_record(outside, 1), outside), (_record(corrupt, 2), corrupt)])
    assert [(type(f), f.reason) for f in failed] == [(Failed, "path-escape"), (Failed, "shard-corrupt")]
