"""Settings of teacher-inference (`distill run teacher`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.common.config import CommonSettings


class TeacherSettings(CommonSettings):
    grpc_port: int = 0
    # Triton's gRPC endpoint and the model to call.
    triton_url: str = "127.0.0.1:8001"
    triton_model: str = "teacher"
    # Requests kept in flight to Triton so its dynamic batcher fills (about 2 x max batch size).
    in_flight: int = Field(default=16, ge=1, le=1024)
    # Per-request deadline; a teacher slower than this counts as unavailable (retried).
    request_timeout_s: float = 120.0
    # Defaults for generation parameters a prompt leaves unset.
    logprobs_k: int = Field(default=20, ge=1)
    max_new_tokens: int = Field(default=64, ge=1)
    temperature: float = 0.0
    top_p: float = 1.0
    # A prompt the teacher fails on this many times (internal errors) is dead-lettered.
    max_attempts: int = Field(default=3, ge=1)
    # Teacher registry (YAML): who owns each teacher, its licence, whether distillation is allowed.
    teacher_registry: Path = Path("deploy/teachers.yaml")
    # The teacher's owner may serve it although the registry does not permit it; recorded in lineage.
    teacher_policy_override: bool = False
