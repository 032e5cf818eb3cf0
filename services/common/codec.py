"""Wire codecs: protobuf (the default) and JSON, chosen by the `content-type` header.

Decode failures raise `DecodeError` with a reason a person can act on; the loop turns them into
dead letters.
"""

from __future__ import annotations

import json
from typing import TypeVar

from google.protobuf import json_format
from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.message import Message

PROTOBUF = "application/x-protobuf"
JSON = "application/json"

M = TypeVar("M", bound=Message)
Headers = list[tuple[str, bytes]]


class DecodeError(ValueError):
    """A record that cannot become the expected message. `reason` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def header(headers: Headers | None, name: str) -> str | None:
    for key, value in headers or ():
        if key == name:
            try:
                return value.decode("utf-8") if isinstance(value, bytes) else str(value)
            except UnicodeDecodeError:
                return None
    return None


def encode(message: Message, extra_headers: Headers | None = None) -> tuple[bytes, Headers]:
    headers: Headers = [
        ("content-type", PROTOBUF.encode()),
        ("schema", message.DESCRIPTOR.full_name.encode()),
    ]
    return message.SerializeToString(deterministic=True), headers + list(extra_headers or ())


def parse_json(value: bytes) -> object:
    """UTF-8 JSON bytes -> Python value; DecodeError names what is wrong."""
    try:
        return json.loads(value.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DecodeError("invalid-utf8", str(exc)) from exc
    except json.JSONDecodeError as exc:
        raise DecodeError("malformed-json", str(exc)) from exc


def decode(value: bytes | None, headers: Headers | None, message_cls: type[M]) -> M:
    """Decode a record as `message_cls`, honouring the content-type and schema headers."""
    if value is None:
        raise DecodeError("empty", "record has no value (tombstone)")
    content_type = header(headers, "content-type") or PROTOBUF
    schema = header(headers, "schema")
    expected = message_cls.DESCRIPTOR.full_name
    if schema is not None and schema != expected:
        raise DecodeError("wrong-schema", f"schema header {schema!r}, expected {expected!r}")
    if content_type.startswith(JSON):
        data = parse_json(value)
        try:
            return json_format.ParseDict(data, message_cls())
        except json_format.ParseError as exc:
            raise DecodeError("schema-invalid", str(exc)) from exc
    if content_type.startswith(PROTOBUF):
        message = message_cls()
        try:
            message.ParseFromString(value)
        except ProtobufDecodeError as exc:
            raise DecodeError("malformed-protobuf", str(exc)) from exc
        return message
    raise DecodeError("unknown-content-type", f"content-type {content_type!r}")
