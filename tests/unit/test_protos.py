"""Schemas: the checked-in generated code is fresh, and every message round-trips."""

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from distillery.v1 import checkpoint_pb2, common_pb2, dataset_pb2, prompt_pb2, services_pb2, teacher_output_pb2

ROOT = Path(__file__).resolve().parents[2]
MODULES = [checkpoint_pb2, common_pb2, dataset_pb2, prompt_pb2, services_pb2, teacher_output_pb2]


def test_generated_code_is_not_stale():
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, f"run `make protos`: {result.stdout}{result.stderr}"


def _messages():
    for module in MODULES:
        for name, desc in module.DESCRIPTOR.message_types_by_name.items():
            yield pytest.param(getattr(module, name), id=f"{module.__name__.split('.')[-1]}.{name}")


def _fill(message: Message, depth: int = 0) -> Message:
    """Set every field to a non-default value so a round trip that loses a field fails."""
    from google.protobuf.descriptor import FieldDescriptor as F

    for field in message.DESCRIPTOR.fields:
        if field.containing_oneof is not None and field.containing_oneof.fields[0] is not field:
            continue  # set only the first member of each oneof
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                getattr(message, field.name)["k"] = (
                    "v" if field.message_type.fields_by_name["value"].type == F.TYPE_STRING else 1
                )
                continue
            if depth > 3:
                continue
            if field.message_type.full_name == "google.protobuf.Timestamp":
                target = getattr(message, field.name).add() if field.is_repeated else getattr(message, field.name)
                target.FromJsonString("2026-01-02T03:04:05Z")
                continue
            target = getattr(message, field.name).add() if field.is_repeated else getattr(message, field.name)
            _fill(target, depth + 1)
            continue
        value = {
            F.TYPE_STRING: "x",
            F.TYPE_BYTES: b"\x01\x02",
            F.TYPE_BOOL: True,
            F.TYPE_FLOAT: 0.5,
            F.TYPE_DOUBLE: 0.25,
            F.TYPE_ENUM: 1,
        }.get(field.type, 3)
        if field.is_repeated:
            getattr(message, field.name).append(value)
        else:
            setattr(message, field.name, value)
    return message


@pytest.mark.parametrize("cls", list(_messages()))
def test_every_message_round_trips(cls):
    original = _fill(cls())
    assert original.ByteSize() > 0 or not cls.DESCRIPTOR.fields
    wire = cls.FromString(original.SerializeToString())
    assert wire == original
    via_json = json_format.Parse(json_format.MessageToJson(original), cls())
    assert via_json == original


def test_services_are_defined():
    services = services_pb2.DESCRIPTOR.services_by_name
    assert set(services["PromptService"].methods_by_name) == {"Submit"}
    assert {"ListCheckpoints", "WatchCheckpoints", "GetStatus"} <= set(services["TrainerService"].methods_by_name)
    assert services["PromptService"].methods_by_name["Submit"].client_streaming
    assert services["TrainerService"].methods_by_name["WatchCheckpoints"].server_streaming
