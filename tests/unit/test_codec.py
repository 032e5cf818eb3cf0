"""Wire codecs, prompt parsing/validation and compact top-k."""

import json

import numpy as np
import pytest

from distillery.v1 import checkpoint_pb2, prompt_pb2
from services.common import codec
from services.common.prompts import InvalidPrompt, PromptLimits, content_id, decode_prompt, prompt_from_json
from services.common.topk import pack, unpack

LIMITS = PromptLimits(max_prompt_chars=100)


def test_protobuf_round_trip_with_headers():
    msg = checkpoint_pb2.CheckpointReady(run_id="r1", step=7, uri="file:///x")
    value, headers = codec.encode(msg)
    assert dict(headers)["content-type"] == codec.PROTOBUF.encode()
    assert dict(headers)["schema"] == b"distillery.v1.CheckpointReady"
    assert codec.decode(value, headers, checkpoint_pb2.CheckpointReady) == msg


@pytest.mark.parametrize(
    "value,headers,reason",
    [
        (None, [], "empty"),
        (b"\xff\xff\xff", [("content-type", b"application/x-protobuf")], "malformed-protobuf"),
        (b"{nope", [("content-type", b"application/json")], "malformed-json"),
        (b"\xff{", [("content-type", b"application/json")], "invalid-utf8"),
        (b"{}", [("schema", b"distillery.v1.Prompt")], "wrong-schema"),
        (b"x", [("content-type", b"text/csv")], "unknown-content-type"),
        (b'{"bogus": 1}', [("content-type", b"application/json")], "schema-invalid"),
    ],
)
def test_decode_errors_name_the_reason(value, headers, reason):
    with pytest.raises(codec.DecodeError) as err:
        codec.decode(value, headers, checkpoint_pb2.CheckpointReady)
    assert err.value.reason == reason


def test_plain_json_prompt_without_headers_gets_a_content_id():
    raw = json.dumps({"prompt": "reverse: a b", "max_new_tokens": 8, "source": "file.jsonl"}).encode()
    p1 = decode_prompt(raw, None, LIMITS)
    p2 = decode_prompt(raw, [], LIMITS)
    assert p1.text == "reverse: a b" and p1.params.max_new_tokens == 8 and p1.source == "file.jsonl"
    assert p1.id.startswith("h-") and p1.id == p2.id
    other = decode_prompt(json.dumps({"prompt": "reverse: a b", "max_new_tokens": 9}).encode(), None, LIMITS)
    assert other.id != p1.id, "generation parameters are part of the content id"


def test_explicit_id_and_chat_and_protobuf():
    p = decode_prompt(json.dumps({"id": "p-1", "messages": [{"role": "user", "content": "hi"}]}).encode(), None, LIMITS)
    assert p.id == "p-1" and p.chat.messages[0].content == "hi"
    value, headers = codec.encode(p)
    assert decode_prompt(value, headers, LIMITS) == p


@pytest.mark.parametrize(
    "data,reason",
    [
        ({"prompt": ""}, "empty-prompt"),
        ({"prompt": "   "}, "empty-prompt"),
        ({"prompt": "x" * 101}, "prompt-too-large"),
        ({"prompt": "x", "max_new_tokens": -1}, "invalid-parameter"),
        ({"prompt": "x", "max_new_tokens": 0}, "invalid-parameter"),
        ({"prompt": "x", "temperature": 1e9}, "invalid-parameter"),
        ({"prompt": "x", "top_p": 0}, "invalid-parameter"),
        ({"prompt": "x", "logprobs_k": 100000}, "invalid-parameter"),
        ({"prompt": "x", "temperature": "hot"}, "invalid-parameter"),
        ({"prompt": "x", "beam_width": 4}, "unknown-field"),
        ({"prompt": "x", "messages": []}, "schema-invalid"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "schema-invalid"),
        ({"messages": [{"role": "user", "content": ""}]}, "empty-prompt"),
        (["not", "an", "object"], "schema-invalid"),
    ],
)
def test_invalid_prompts_are_refused_with_a_reason(data, reason):
    with pytest.raises(InvalidPrompt) as err:
        decode_prompt(json.dumps(data).encode(), [("content-type", b"application/json")], LIMITS)
    assert err.value.reason == reason, err.value.detail
    assert err.value.detail


def test_protobuf_with_unknown_fields_is_refused():
    value = prompt_pb2.Prompt(text="x").SerializeToString() + b"\xf8\x3f\x01"  # field 1023, varint
    with pytest.raises(InvalidPrompt) as err:
        decode_prompt(value, [("content-type", b"application/x-protobuf")], LIMITS)
    assert err.value.reason == "unknown-field"


def test_truncated_protobuf_is_refused():
    value = prompt_pb2.Prompt(text="hello world", id="abc").SerializeToString()[:-3]
    with pytest.raises(InvalidPrompt) as err:
        decode_prompt(value, [("content-type", b"application/x-protobuf")], LIMITS)
    assert err.value.reason in {"malformed-protobuf", "empty-prompt"}


def test_content_id_is_stable():
    assert content_id(prompt_from_json({"prompt": "a"})) == content_id(prompt_from_json({"prompt": "a"}))
    assert content_id(prompt_from_json({"prompt": "a"})) != content_id(prompt_from_json({"prompt": "b"}))


def test_topk_pack_unpack_round_trip_within_float16():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50_000, size=(7, 20))
    logprobs = -rng.random((7, 20)).astype(np.float32) * 20
    topk = pack(ids, logprobs, temperature=1.0)
    out_ids, out_lp = unpack(topk)
    assert np.array_equal(out_ids, ids)
    assert np.allclose(out_lp, logprobs, atol=2e-2)
    assert topk.temperature == 1.0
    with pytest.raises(ValueError):
        pack(ids, logprobs[:, :5])
    with pytest.raises(ValueError):
        unpack(type(topk)(k=3, ids=[1, 2], logprobs_f16=b"\x00\x00" * 2))
