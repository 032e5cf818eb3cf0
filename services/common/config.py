"""The one config loader: frozen pydantic-settings models read from `DISTILL_*` variables.

`CommonSettings` holds what every service needs (Kafka, data dir, logging, ports); each service's
`config.py` extends it with its own fields. Values come from, in order of precedence: keyword
arguments (the CLI passes flags this way), environment variables, then the defaults below, which
serve the local stack (`distill up`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from typing import Literal

from pydantic import SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from services.common.prompts import PromptLimits

ENV_PREFIX = "DISTILL_"

# Logical topic names; the configured prefix is put in front (`distill.prompts`, ...).
PROMPTS = "prompts"
TEACHER_OUTPUTS = "teacher-outputs"
SHARDS = "shards"
CHECKPOINTS = "checkpoints"
DEAD_LETTERS = "dead-letters"
TOPICS = (PROMPTS, TEACHER_OUTPUTS, SHARDS, CHECKPOINTS, DEAD_LETTERS)


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    data_dir: Path = Path(".distill")
    # Where dataset shards live (shared by the sink, which writes, and the trainer, which reads);
    # empty means <data_dir>/datasets.
    datasets_dir: Path | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    # Producer-side compression of every record the project writes.
    kafka_compression: Literal["none", "gzip", "lz4", "zstd"] = "zstd"
    # Largest record a producer will send (the broker's message.max.bytes must allow it).
    kafka_max_request_bytes: int = 8 * 1024 * 1024
    topic_prefix: str = "distill."

    # gRPC port of the service: its own API where it has one, and grpc.health.v1 always.
    grpc_port: int = 0
    # TLS for the service's gRPC server (both set: TLS on; the CA file is for health checks).
    grpc_tls_certfile: Path | None = None
    grpc_tls_keyfile: Path | None = None
    grpc_tls_cafile: Path | None = None
    # Prometheus metrics port; 0 disables the endpoint.
    metrics_port: int = 0

    # How often a consuming service waits for its outputs' acknowledgements and commits offsets.
    commit_interval_s: float = 0.5

    # Prompt rules, applied by the producer before sending and by teacher-inference on receipt.
    max_prompt_chars: int = 32_768
    max_new_tokens_limit: int = 4_096
    max_logprobs_k: int = 128

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("DISTILL_KAFKA_BOOTSTRAP must name at least one host:port")
        return value

    def shards_root(self) -> Path:
        return self.datasets_dir or self.data_dir / "datasets"

    def prompt_limits(self) -> "PromptLimits":
        from services.common.prompts import PromptLimits

        return PromptLimits(
            max_prompt_chars=self.max_prompt_chars,
            max_new_tokens=self.max_new_tokens_limit,
            max_logprobs_k=self.max_logprobs_k,
        )

    def topic(self, name: str) -> str:
        """Full topic name of a logical topic (one of TOPICS)."""
        if name not in TOPICS:
            raise ValueError(f"unknown topic {name!r}; expected one of {TOPICS}")
        return f"{self.topic_prefix}{name}"


def load(settings_cls: type[BaseSettings], **overrides) -> BaseSettings:
    """Build settings from the environment, with CLI flags (non-None overrides) on top."""
    return settings_cls(**{k: v for k, v in overrides.items() if v is not None})
