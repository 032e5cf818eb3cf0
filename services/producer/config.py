"""Settings of the prompt producer (`distill run producer`, `distill submit`)."""

from __future__ import annotations

from services.common.config import CommonSettings


class ProducerSettings(CommonSettings):
    # gRPC PromptService port of `distill run producer` (0 picks a free one).
    grpc_port: int = 50051
    # Records are sent in chunks of this many, each chunk flushed and checked before the next.
    submit_chunk: int = 500
