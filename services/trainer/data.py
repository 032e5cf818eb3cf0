"""From Parquet shards to training batches: prompt + completion token ids, with the teacher's
top-k aligned to the positions that predict each completion token (the logits at position
len(prompt) + i - 1 predict completion token i).

Rows are held out for evaluation by a stable hash of their prompt id (the same prompt is on the
same side in every shard and every run); the training order is a seeded shuffle. Batches are
right-padded by default, left-padded on request; `position_ids` count real tokens only, so
either side gives the model the same positions.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from services.common.dataset import SCHEMA_VERSION

COLUMNS = ["prompt_id", "prompt_token_ids", "completion_token_ids", "topk_k", "topk_ids", "topk_logprobs",
           "capture_temperature"]
PAD_LOGPROB = -1e4  # a padded top-k slot: probability ~0


class ShardFormatError(ValueError):
    pass


def read_shard(path: Path | str) -> pa.Table:
    """A shard as a table, after checking its schema version and columns. `path` may be a local
    path, a `file://` URI, or any URI pyarrow's filesystems read (s3://, gs://, ...)."""
    if isinstance(path, str) and path.startswith("file://"):
        path = Path(unquote(urlparse(path).path))
    table = pq.read_table(path)
    version = (table.schema.metadata or {}).get(b"distillery.schema_version")
    if version is None or int(version) != SCHEMA_VERSION:
        raise ShardFormatError(f"{path}: schema version {version!r}, this trainer reads {SCHEMA_VERSION}")
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ShardFormatError(f"{path}: missing columns {missing}")
    return table


def is_held_out(prompt_id: str, fraction: float) -> bool:
    """A stable split by prompt id: the same prompt is always on the same side."""
    if fraction <= 0:
        return False
    bucket = int.from_bytes(hashlib.sha256(prompt_id.encode()).digest()[:4], "big") / 2**32
    return bucket < fraction


@dataclass
class Example:
    prompt_id: str
    input_ids: list[int]
    prompt_len: int
    topk_ids: list[list[int]]  # [completion_len][k]
    topk_logprobs: list[list[float]]
    capture_temperature: float


def examples(table: pa.Table, max_len: int = 1 << 30) -> list[Example]:
    out = []
    for row in table.select(COLUMNS).to_pylist():
        prompt, completion, k = row["prompt_token_ids"], row["completion_token_ids"], int(row["topk_k"])
        if not completion or k == 0 or not prompt:
            continue
        keep = max(0, min(len(completion), max_len - len(prompt)))
        if keep == 0:
            continue
        ids, lps = row["topk_ids"], row["topk_logprobs"]
        out.append(Example(
            prompt_id=row["prompt_id"],
            input_ids=list(prompt) + list(completion[:keep]),
            prompt_len=len(prompt),
            topk_ids=[ids[i * k:(i + 1) * k] for i in range(keep)],
            topk_logprobs=[lps[i * k:(i + 1) * k] for i in range(keep)],
            capture_temperature=float(row["capture_temperature"] or 1.0),
        ))
    return out


def split(items: list[Example], eval_fraction: float) -> tuple[list[Example], list[Example]]:
    train = [e for e in items if not is_held_out(e.prompt_id, eval_fraction)]
    held = [e for e in items if is_held_out(e.prompt_id, eval_fraction)]
    return train, held


def collate(batch: list[Example], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Padded tensors; `target` marks positions whose next token is a completion token, `labels`
    holds that token there, `topk_*` the teacher's top-k for it."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    width = max(len(e.input_ids) for e in batch)
    k = max(len(e.topk_ids[0]) for e in batch)
    n = len(batch)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    target = torch.zeros((n, width), dtype=torch.float32)
    labels = torch.zeros((n, width), dtype=torch.long)
    topk_ids = torch.zeros((n, width, k), dtype=torch.long)
    topk_lp = torch.full((n, width, k), PAD_LOGPROB, dtype=torch.float32)
    for b, e in enumerate(batch):
        length = len(e.input_ids)
        offset = width - length if padding_side == "left" else 0
        input_ids[b, offset:offset + length] = torch.tensor(e.input_ids)
        attention[b, offset:offset + length] = 1
        steps = len(e.topk_ids)
        first = offset + e.prompt_len - 1  # the position whose logits predict completion token 0
        row_k = len(e.topk_ids[0])
        target[b, first:first + steps] = 1.0
        labels[b, first:first + steps] = torch.tensor(e.input_ids[e.prompt_len:e.prompt_len + steps])
        topk_ids[b, first:first + steps, :row_k] = torch.tensor(e.topk_ids)
        topk_lp[b, first:first + steps, :row_k] = torch.tensor(e.topk_logprobs)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention, "position_ids": position_ids, "target": target,
            "labels": labels, "topk_ids": topk_ids, "topk_logprobs": topk_lp,
            "capture_temperature": torch.tensor([e.capture_temperature for e in batch])}


def batches(items: list[Example], batch_size: int, pad_id: int, seed: int,
            padding_side: str = "right") -> list[dict[str, torch.Tensor]]:
    order = list(items)
    random.Random(seed).shuffle(order)
    return [collate(order[i:i + batch_size], pad_id, padding_side) for i in range(0, len(order), batch_size)]


class ShardBatches:
    """One shard's rows split into training and held-out examples, batched on iteration.

    `ShardBatches(table, batch_size=16, pad_id=0, max_len=1024, seed=0, eval_fraction=0.1)`:
    iterating yields the training batches in a seeded order (the same seed, the same order);
    `held_out_batches()` the held-out ones, unshuffled.
    """

    def __init__(self, table: pa.Table, batch_size: int, pad_id: int, max_len: int = 1 << 30, seed: int = 0,
                 eval_fraction: float = 0.1, padding_side: str = "right"):
        self.batch_size, self.pad_id, self.seed, self.padding_side = batch_size, pad_id, seed, padding_side
        self.train, self.held_out = split(examples(table, max_len), eval_fraction)

    def __iter__(self):
        return iter(batches(self.train, self.batch_size, self.pad_id, self.seed, self.padding_side))

    def __len__(self) -> int:
        return -(-len(self.train) // self.batch_size)

    def held_out_batches(self) -> list[dict[str, torch.Tensor]]:
        return [collate(self.held_out[i:i + self.batch_size], self.pad_id, self.padding_side)
                for i in range(0, len(self.held_out), self.batch_size)]
