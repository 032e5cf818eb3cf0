import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from distillery.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ShardRef(_message.Message):
    __slots__ = ("shard_id", "sha256", "uri", "record_count")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    RECORD_COUNT_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    sha256: str
    uri: str
    record_count: int
    def __init__(self, shard_id: _Optional[str] = ..., sha256: _Optional[str] = ..., uri: _Optional[str] = ..., record_count: _Optional[int] = ...) -> None: ...

class CheckpointMetrics(_message.Message):
    __slots__ = ("train_loss", "kd_loss", "eval_kl", "token_agreement", "eval_rows")
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    KD_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_KL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    EVAL_ROWS_FIELD_NUMBER: _ClassVar[int]
    train_loss: float
    kd_loss: float
    eval_kl: float
    token_agreement: float
    eval_rows: int
    def __init__(self, train_loss: _Optional[float] = ..., kd_loss: _Optional[float] = ..., eval_kl: _Optional[float] = ..., token_agreement: _Optional[float] = ..., eval_rows: _Optional[int] = ...) -> None: ...

class StudentIdentity(_message.Message):
    __slots__ = ("model_name", "parameters", "vocab_size", "tokenizer_hash")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_HASH_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    parameters: int
    vocab_size: int
    tokenizer_hash: str
    def __init__(self, model_name: _Optional[str] = ..., parameters: _Optional[int] = ..., vocab_size: _Optional[int] = ..., tokenizer_hash: _Optional[str] = ...) -> None: ...

class CheckpointReady(_message.Message):
    __slots__ = ("run_id", "step", "uri", "samples", "shards", "metrics", "teacher", "student", "created_at", "lineage_uri")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    STUDENT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_URI_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    uri: str
    samples: int
    shards: _containers.RepeatedCompositeFieldContainer[ShardRef]
    metrics: CheckpointMetrics
    teacher: _common_pb2.TeacherIdentity
    student: StudentIdentity
    created_at: _timestamp_pb2.Timestamp
    lineage_uri: str
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., uri: _Optional[str] = ..., samples: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[ShardRef, _Mapping]]] = ..., metrics: _Optional[_Union[CheckpointMetrics, _Mapping]] = ..., teacher: _Optional[_Union[_common_pb2.TeacherIdentity, _Mapping]] = ..., student: _Optional[_Union[StudentIdentity, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lineage_uri: _Optional[str] = ...) -> None: ...
