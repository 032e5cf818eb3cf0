"""Settings of the dataset sink (`distill run sink`)."""

from __future__ import annotations

from pydantic import Field

from services.common.config import CommonSettings


class SinkSettings(CommonSettings):
    # Dataset name: shards land in <datasets_dir>/<dataset>/ and ShardReady is keyed by it.
    dataset: str = "default"
    # A shard closes at whichever comes first.
    shard_max_rows: int = Field(default=5000, ge=1)
    shard_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    shard_max_age_s: float = Field(default=30.0, gt=0)
