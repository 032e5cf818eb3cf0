"""Compact top-k log-probabilities: ids varint-packed, log-probs as little-endian float16.

At k=20 a token costs 20 x ~2 bytes of ids (vocabularies under 16k) + 20 x 2 bytes of log-probs,
before the producer's zstd compression.
"""

from __future__ import annotations

import numpy as np

from distillery.v1 import teacher_output_pb2


def pack(ids: np.ndarray, logprobs: np.ndarray, temperature: float = 1.0) -> teacher_output_pb2.TopK:
    """ids and logprobs are [tokens, k] arrays from the teacher."""
    ids = np.asarray(ids)
    logprobs = np.asarray(logprobs, dtype=np.float32)
    if ids.shape != logprobs.shape or ids.ndim != 2:
        raise ValueError(f"top-k ids {ids.shape} and logprobs {logprobs.shape} must both be [tokens, k]")
    if ids.size and ids.min() < 0:
        raise ValueError("top-k ids must be non-negative")
    return teacher_output_pb2.TopK(
        k=ids.shape[1],
        ids=ids.astype(np.uint32).ravel().tolist(),
        logprobs_f16=logprobs.astype("<f2").tobytes(),
        temperature=temperature,
    )


def unpack(topk: teacher_output_pb2.TopK) -> tuple[np.ndarray, np.ndarray]:
    """Back to ([tokens, k] int64 ids, [tokens, k] float32 logprobs)."""
    k = topk.k
    ids = np.asarray(topk.ids, dtype=np.int64)
    logprobs = np.frombuffer(topk.logprobs_f16, dtype="<f2").astype(np.float32)
    if k == 0:
        if ids.size or logprobs.size:
            raise ValueError("top-k with k=0 carries data")
        return ids.reshape(0, 0), logprobs.reshape(0, 0)
    if ids.size != logprobs.size or ids.size % k:
        raise ValueError(f"top-k payload sizes do not match: {ids.size} ids, {logprobs.size} logprobs, k={k}")
    return ids.reshape(-1, k), logprobs.reshape(-1, k)
