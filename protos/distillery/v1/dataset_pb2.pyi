import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from distillery.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OffsetRange(_message.Message):
    __slots__ = ("topic", "partition", "first", "last")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    topic: str
    partition: int
    first: int
    last: int
    def __init__(self, topic: _Optional[str] = ..., partition: _Optional[int] = ..., first: _Optional[int] = ..., last: _Optional[int] = ...) -> None: ...

class ShardReady(_message.Message):
    __slots__ = ("dataset", "shard_id", "uri", "record_count", "bytes", "sha256", "offsets", "teachers", "schema_version", "created_at", "token_count", "manifest_uri")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    RECORD_COUNT_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    TEACHERS_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_URI_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    shard_id: str
    uri: str
    record_count: int
    bytes: int
    sha256: str
    offsets: _containers.RepeatedCompositeFieldContainer[OffsetRange]
    teachers: _containers.RepeatedCompositeFieldContainer[_common_pb2.TeacherIdentity]
    schema_version: int
    created_at: _timestamp_pb2.Timestamp
    token_count: int
    manifest_uri: str
    def __init__(self, dataset: _Optional[str] = ..., shard_id: _Optional[str] = ..., uri: _Optional[str] = ..., record_count: _Optional[int] = ..., bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., offsets: _Optional[_Iterable[_Union[OffsetRange, _Mapping]]] = ..., teachers: _Optional[_Iterable[_Union[_common_pb2.TeacherIdentity, _Mapping]]] = ..., schema_version: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., token_count: _Optional[int] = ..., manifest_uri: _Optional[str] = ...) -> None: ...
