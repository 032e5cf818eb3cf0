"""The dataset's row format: one Parquet row per (prompt id, teacher revision).

Written by the sink, read by the trainer and by users (`datasets.load_dataset("parquet", ...)`,
plain pyarrow). Top-k is stored flattened (completion_len * k) with `topk_k` giving the width.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
from google.protobuf import json_format

from distillery.v1 import teacher_output_pb2
from services.common.topk import unpack

SCHEMA_VERSION = 1

_TS = pa.timestamp("ms", tz="UTC")

SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("teacher_revision", pa.string()),
        ("prompt_kind", pa.string()),  # "text" or "chat"
        ("prompt", pa.string()),  # the text, or the chat as JSON
        ("completion", pa.string()),
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("completion_token_ids", pa.list_(pa.int32())),
        ("topk_k", pa.int16()),
        ("topk_ids", pa.list_(pa.int32())),
        ("topk_logprobs", pa.list_(pa.float32())),
        ("capture_temperature", pa.float32()),
        ("finish_reason", pa.string()),
        ("teacher_model", pa.string()),
        ("teacher_version", pa.string()),
        ("teacher_tokenizer_hash", pa.string()),
        ("teacher_vocab_size", pa.int32()),
        ("teacher_license", pa.string()),
        ("teacher_owner", pa.string()),
        ("distillation_permitted", pa.bool_()),
        ("policy_override", pa.bool_()),
        ("triton_version", pa.string()),
        ("max_new_tokens", pa.int32()),
        ("temperature", pa.float32()),
        ("top_p", pa.float32()),
        ("seed", pa.int64()),
        ("source", pa.string()),
        ("prompt_license", pa.string()),
        ("metadata", pa.string()),  # JSON object
        ("created_at", _TS),
        ("received_at", _TS),
        ("generated_at", _TS),
        ("written_at", _TS),
        ("kafka_topic", pa.string()),
        ("kafka_partition", pa.int32()),
        ("kafka_offset", pa.int64()),
    ],
    metadata={b"distillery.schema_version": str(SCHEMA_VERSION).encode()},
)


def _ts(timestamp) -> datetime | None:
    if timestamp.seconds == 0 and timestamp.nanos == 0:
        return None
    return timestamp.ToDatetime(tzinfo=timezone.utc)


def dedup_key(output: teacher_output_pb2.TeacherOutput) -> tuple[str, str]:
    return output.prompt_id, output.teacher.revision


def row_from_output(
    output: teacher_output_pb2.TeacherOutput, topic: str, partition: int, offset: int, written_at: datetime
) -> dict:
    prompt = output.prompt
    kind = prompt.WhichOneof("input") or "text"
    if kind == "chat":
        text = json.dumps(json_format.MessageToDict(prompt.chat).get("messages", []), ensure_ascii=False)
    else:
        text = prompt.text
    ids, logprobs = unpack(output.topk)
    params = output.params
    teacher = output.teacher
    lineage = output.lineage
    return {
        "prompt_id": output.prompt_id,
        "teacher_revision": teacher.revision,
        "prompt_kind": kind,
        "prompt": text,
        "completion": output.completion,
        "prompt_token_ids": list(output.prompt_token_ids),
        "completion_token_ids": list(output.completion_token_ids),
        "topk_k": output.topk.k,
        "topk_ids": ids.ravel().astype(np.int32).tolist(),
        "topk_logprobs": logprobs.ravel().tolist(),
        "capture_temperature": output.topk.temperature,
        "finish_reason": teacher_output_pb2.FinishReason.Name(output.finish_reason)
        .removeprefix("FINISH_REASON_")
        .lower(),
        "teacher_model": teacher.model_name,
        "teacher_version": teacher.model_version,
        "teacher_tokenizer_hash": teacher.tokenizer_hash,
        "teacher_vocab_size": teacher.vocab_size,
        "teacher_license": teacher.license,
        "teacher_owner": teacher.owner,
        "distillation_permitted": teacher.distillation_permitted,
        "policy_override": teacher.policy_override,
        "triton_version": teacher.triton_version,
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "seed": params.seed if params.HasField("seed") else None,
        "source": lineage.source or prompt.source,
        "prompt_license": lineage.prompt_license or prompt.license,
        "metadata": json.dumps(dict(prompt.metadata), sort_keys=True),
        "created_at": _ts(lineage.created_at) or _ts(prompt.created_at),
        "received_at": _ts(lineage.received_at),
        "generated_at": _ts(lineage.generated_at),
        "written_at": written_at,
        "kafka_topic": topic,
        "kafka_partition": partition,
        "kafka_offset": offset,
    }


def rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)
