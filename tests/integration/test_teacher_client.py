"""Teacher-inference's Triton client and output building, against the real Triton server."""

from __future__ import annotations

import numpy as np
import pytest
from kafka.consumer.fetcher import ConsumerRecord

from distillery.v1 import prompt_pb2, teacher_output_pb2
from services.common import codec
from services.common.dataset import row_from_output
from services.common.loop import Failed, Output, Retry
from services.common.topk import unpack
from services.teacher.config import TeacherSettings
from services.teacher.stage import TeacherStage
from services.teacher.triton_client import TritonTeacher

pytestmark = pytest.mark.integration


def _record(prompt: prompt_pb2.Prompt, offset: int) -> ConsumerRecord:
    value, headers = codec.encode(prompt)
    return ConsumerRecord("distill.prompts", 0, None, offset, 0, 0, prompt.id.encode(), value, headers,
                          None, len(value), len(prompt.id), -1)


@pytest.fixture
def stage(triton_server):
    settings = TeacherSettings(triton_url=triton_server.grpc_url, in_flight=8, logprobs_k=7, max_new_tokens=10)
    teacher = TritonTeacher(settings.triton_url, settings.triton_model, settings.in_flight, 60)
    yield TeacherStage(settings, teacher)
    teacher.close()


def test_batch_becomes_teacher_outputs_with_identity_and_lineage(stage):
    prompts = [prompt_pb2.Prompt(id=f"p{i}", text=f"reverse: {'abcdefghij'[i:i + 3]} =", source="unit")
               for i in range(6)]
    prompts.append(prompt_pb2.Prompt(id="chat", chat={"messages": [{"role": "user", "content": "sort: b a ="}]}))
    records = [_record(p, i) for i, p in enumerate(prompts)]
    items = [(r, stage.decode(r)) for r in records]
    results = stage.process(items)
    assert all(isinstance(r, Output) for r in results) and len(results) == 7
    for record, result in zip(records, results):
        out = codec.decode(result.value, result.headers, teacher_output_pb2.TeacherOutput)
        assert out.prompt_id == record.key.decode() and result.key == record.key
        ids, logprobs = unpack(out.topk)
        assert ids.shape == (len(out.completion_token_ids), 7)
        assert np.all(logprobs <= 0.01)
        assert out.teacher.model_name == "distillery-tiny-teacher" and out.teacher.revision.startswith("sha256:")
        assert out.teacher.triton_version == "2.51.0" and out.teacher.distillation_permitted
        assert out.params.logprobs_k == 7 and out.params.max_new_tokens == 10
        assert out.lineage.prompt_offset == record.offset and out.lineage.HasField("generated_at")
        row = row_from_output(out, record.topic, record.partition, record.offset, __import__("datetime").datetime.now())
        assert row["topk_k"] == 7 and row["teacher_vocab_size"] == out.teacher.vocab_size


def test_teacher_refusal_is_a_dead_letter_not_a_retry(stage):
    prompt = prompt_pb2.Prompt(id="big", text="x", params={"max_new_tokens": 4000})
    record = _record(prompt, 0)
    [result] = stage.process([(record, stage.decode(record))])
    assert isinstance(result, Failed) and result.reason == "teacher-rejected"
    assert "MAX_NEW_TOKENS" in result.detail


def test_triton_down_means_retry():
    settings = TeacherSettings(triton_url="127.0.0.1:1")
    teacher = TritonTeacher(settings.triton_url, "teacher", 2, 5)
    stage = TeacherStage(settings, teacher)
    record = _record(prompt_pb2.Prompt(id="a", text="reverse: a b ="), 0)
    with pytest.raises(Retry):
        stage.process([(record, stage.decode(record))])
    teacher.close()
