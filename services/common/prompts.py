"""Prompts as users write them: parsing (protobuf or the plain JSON of DESIGN.md s2), validation
and content-hash ids. Used by the producer before sending and by teacher-inference on receipt, so
both apply the same rules.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from google.protobuf import json_format, unknown_fields

from distillery.v1 import common_pb2, prompt_pb2
from services.common.codec import JSON, PROTOBUF, DecodeError, Headers, header, parse_json

PARAM_FIELDS = ("max_new_tokens", "temperature", "top_p", "seed", "logprobs_k")
JSON_FIELDS = {"prompt", "messages", "id", "source", "metadata", "license", "created_at", *PARAM_FIELDS}
CHAT_ROLES = {"system", "user", "assistant", "tool"}


@dataclass(frozen=True)
class PromptLimits:
    max_prompt_chars: int = 32_768
    max_new_tokens: int = 4_096
    max_logprobs_k: int = 128
    max_id_chars: int = 256


class InvalidPrompt(DecodeError):
    """A prompt that decodes but breaks a rule; `reason` names the rule."""


def prompt_from_json(data: object) -> prompt_pb2.Prompt:
    """Build a Prompt from the user JSON shape: {"prompt": "..."} or {"messages": [...]}, plus
    optional id, generation parameters, source, license and metadata. Unknown fields are refused."""
    if not isinstance(data, dict):
        raise InvalidPrompt("schema-invalid", f"a prompt is a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - JSON_FIELDS)
    if unknown:
        raise InvalidPrompt("unknown-field", f"unknown field(s) {unknown}; allowed: {sorted(JSON_FIELDS)}")
    if ("prompt" in data) == ("messages" in data):
        raise InvalidPrompt("schema-invalid", 'exactly one of "prompt" or "messages" is required')
    prompt = prompt_pb2.Prompt()
    if "prompt" in data:
        if not isinstance(data["prompt"], str):
            raise InvalidPrompt("schema-invalid", '"prompt" must be a string')
        prompt.text = data["prompt"]
    else:
        messages = data["messages"]
        if not isinstance(messages, list):
            raise InvalidPrompt("schema-invalid", '"messages" must be a list of {"role", "content"}')
        chat = prompt.chat
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or set(m) != {"role", "content"} or not all(
                isinstance(m[k], str) for k in ("role", "content")
            ):
                raise InvalidPrompt("schema-invalid", f'messages[{i}] must be {{"role": str, "content": str}}')
            chat.messages.add(role=m["role"], content=m["content"])
        if not messages:
            chat.SetInParent()
    for key in ("id", "source", "license"):
        if key in data and data[key] is not None:
            if not isinstance(data[key], str):
                raise InvalidPrompt("schema-invalid", f'"{key}" must be a string')
            setattr(prompt, key, data[key])
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
        raise InvalidPrompt("schema-invalid", '"metadata" must be an object')
    for k, v in metadata.items():
        prompt.metadata[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    for key in PARAM_FIELDS:
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidPrompt("invalid-parameter", f'"{key}" must be a number, got {value!r}')
        if key in ("max_new_tokens", "seed", "logprobs_k"):
            if value != int(value) or value < 0:
                raise InvalidPrompt("invalid-parameter", f'"{key}" must be a non-negative integer, got {value!r}')
            value = int(value)
            if value >= 2**63:
                raise InvalidPrompt("invalid-parameter", f'"{key}" is out of range: {value}')
        setattr(prompt.params, key, value)
    if "created_at" in data and data["created_at"] is not None:
        try:
            prompt.created_at.FromJsonString(str(data["created_at"]))
        except ValueError as exc:
            raise InvalidPrompt("schema-invalid", f'"created_at" must be RFC 3339: {exc}') from exc
    return prompt


def prompt_from_json_bytes(value: bytes) -> prompt_pb2.Prompt:
    """UTF-8 JSON bytes (a record value, a JSONL line) -> Prompt; InvalidPrompt names what is wrong."""
    try:
        data = parse_json(value)
    except DecodeError as exc:
        raise InvalidPrompt(exc.reason, exc.detail) from exc
    return prompt_from_json(data)


def prompt_text_length(prompt: prompt_pb2.Prompt) -> int:
    if prompt.WhichOneof("input") == "chat":
        return sum(len(m.content) + len(m.role) for m in prompt.chat.messages)
    return len(prompt.text)


def validate(prompt: prompt_pb2.Prompt, limits: PromptLimits) -> None:
    """Raise InvalidPrompt naming the first broken rule."""
    kind = prompt.WhichOneof("input")
    if kind is None:
        raise InvalidPrompt("empty-prompt", "prompt has neither text nor chat messages")
    if kind == "text" and not prompt.text.strip():
        raise InvalidPrompt("empty-prompt", "prompt text is empty")
    if kind == "chat":
        if not prompt.chat.messages or not any(m.content.strip() for m in prompt.chat.messages):
            raise InvalidPrompt("empty-prompt", "chat has no non-empty message")
        for i, m in enumerate(prompt.chat.messages):
            if m.role not in CHAT_ROLES:
                raise InvalidPrompt("schema-invalid", f"messages[{i}].role {m.role!r} not in {sorted(CHAT_ROLES)}")
    size = prompt_text_length(prompt)
    if size > limits.max_prompt_chars:
        raise InvalidPrompt("prompt-too-large", f"prompt has {size} characters, limit {limits.max_prompt_chars}")
    if len(prompt.id) > limits.max_id_chars:
        raise InvalidPrompt("invalid-id", f"id longer than {limits.max_id_chars} characters")
    p = prompt.params
    if p.HasField("max_new_tokens") and not 1 <= p.max_new_tokens <= limits.max_new_tokens:
        raise InvalidPrompt("invalid-parameter", f"max_new_tokens {p.max_new_tokens} not in [1, {limits.max_new_tokens}]")
    if p.HasField("temperature") and not (math.isfinite(p.temperature) and 0.0 <= p.temperature <= 10.0):
        raise InvalidPrompt("invalid-parameter", f"temperature {p.temperature} not in [0, 10]")
    if p.HasField("top_p") and not (math.isfinite(p.top_p) and 0.0 < p.top_p <= 1.0):
        raise InvalidPrompt("invalid-parameter", f"top_p {p.top_p} not in (0, 1]")
    if p.HasField("logprobs_k") and not 1 <= p.logprobs_k <= limits.max_logprobs_k:
        raise InvalidPrompt("invalid-parameter", f"logprobs_k {p.logprobs_k} not in [1, {limits.max_logprobs_k}]")


def content_id(prompt: prompt_pb2.Prompt) -> str:
    """Content hash of the input and the generation parameters: the same prompt pushed twice gets
    the same id, hence one dataset row."""
    body = {
        "input": json_format.MessageToDict(prompt.chat) if prompt.WhichOneof("input") == "chat" else prompt.text,
        "params": json_format.MessageToDict(prompt.params, preserving_proto_field_name=True),
    }
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"h-{digest[:32]}"


def normalise(prompt: prompt_pb2.Prompt, limits: PromptLimits) -> prompt_pb2.Prompt:
    """Validate, then give the prompt its id (content hash when absent)."""
    validate(prompt, limits)
    if not prompt.id:
        prompt.id = content_id(prompt)
    return prompt


def decode_prompt(value: bytes | None, headers: Headers | None, limits: PromptLimits) -> prompt_pb2.Prompt:
    """Decode a record from distill.prompts: protobuf, or JSON as a plain console producer sends it
    (no headers: a value that starts with '{' is taken as JSON)."""
    if value is None:
        raise InvalidPrompt("empty", "record has no value")
    content_type = header(headers, "content-type")
    schema = header(headers, "schema")
    if schema is not None and schema != prompt_pb2.Prompt.DESCRIPTOR.full_name:
        raise InvalidPrompt("wrong-schema", f"schema header {schema!r}, expected distillery.v1.Prompt")
    if content_type is None:
        content_type = JSON if value.lstrip()[:1] == b"{" else PROTOBUF
    if content_type.startswith(JSON):
        prompt = prompt_from_json_bytes(value)
    elif content_type.startswith(PROTOBUF):
        prompt = prompt_pb2.Prompt()
        try:
            prompt.ParseFromString(value)
        except Exception as exc:  # protobuf raises DecodeError, or RuntimeWarning-ish ValueErrors
            raise InvalidPrompt("malformed-protobuf", str(exc)) from exc
        if len(unknown_fields.UnknownFieldSet(prompt)):
            raise InvalidPrompt("unknown-field", "protobuf prompt carries unknown fields")
    else:
        raise InvalidPrompt("unknown-content-type", f"content-type {content_type!r}")
    return normalise(prompt, limits)


def params_with_defaults(params: common_pb2.GenerationParams, defaults: common_pb2.GenerationParams) -> common_pb2.GenerationParams:
    merged = common_pb2.GenerationParams()
    merged.CopyFrom(defaults)
    merged.MergeFrom(params)
    return merged
