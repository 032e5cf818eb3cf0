"""The teacher model on the real Triton server, called with tritonclient gRPC."""

from __future__ import annotations

import json
import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from services.stack.errors import LaunchError
from services.stack.models import tokenizer_hash, weights_hash
from services.stack.triton import MODEL_REPOSITORY, TritonServer

pytestmark = pytest.mark.integration

OUTPUTS = ["COMPLETION", "PROMPT_IDS", "COMPLETION_IDS", "TOPK_IDS", "TOPK_LOGPROBS", "FINISH_REASON", "TEACHER_INFO"]


def _inputs(prompt: str, chat: bool = False, max_new_tokens: int = 12, k: int = 5, temperature: float = 0.0,
            seed: int | None = None):
    tensors = []
    for name, value, dtype, np_dtype in [
        ("PROMPT", prompt.encode(), "BYTES", object), ("IS_CHAT", chat, "BOOL", bool),
        ("MAX_NEW_TOKENS", max_new_tokens, "INT32", np.int32), ("LOGPROBS_K", k, "INT32", np.int32),
        ("TEMPERATURE", temperature, "FP32", np.float32),
    ] + ([("SEED", seed, "INT64", np.int64)] if seed is not None else []):
        t = grpcclient.InferInput(name, [1, 1], dtype)
        t.set_data_from_numpy(np.array([[value]], dtype=np_dtype))
        tensors.append(t)
    return tensors


@pytest.fixture(scope="module")
def client(triton_server):
    c = grpcclient.InferenceServerClient(triton_server.grpc_url)
    yield c
    c.close()


def test_text_prompt_returns_completion_and_topk(client, model_dirs):
    result = client.infer("teacher", _inputs("reverse: a b c =", k=5))
    ids = result.as_numpy("COMPLETION_IDS").reshape(-1)
    topk_ids, topk_lp = result.as_numpy("TOPK_IDS")[0], result.as_numpy("TOPK_LOGPROBS")[0]
    assert 1 <= len(ids) <= 12
    assert topk_ids.shape == topk_lp.shape == (len(ids), 5)
    assert (topk_lp <= 0).all() and (np.diff(topk_lp, axis=1) <= 1e-6).all(), "sorted, best first"
    assert (np.log(np.exp(topk_lp).sum(axis=1)) <= 1e-4).all(), "top-k mass cannot exceed 1"
    assert (topk_ids[:, 0] == ids).all(), "greedy picks the top-1 token"
    assert result.as_numpy("FINISH_REASON").reshape(-1)[0] in (b"stop", b"length")
    info = json.loads(result.as_numpy("TEACHER_INFO").reshape(-1)[0])
    assert info["revision"] == "sha256:" + weights_hash(model_dirs[0])
    assert info["tokenizer_hash"] == "sha256:" + tokenizer_hash(model_dirs[0])
    assert info["vocab_size"] > 0 and info["capture_temperature"] == 1.0


def test_greedy_is_deterministic_and_chat_works(client):
    a = client.infer("teacher", _inputs("sort: c a b =")).as_numpy("COMPLETION_IDS")
    b = client.infer("teacher", _inputs("sort: c a b =")).as_numpy("COMPLETION_IDS")
    assert np.array_equal(a, b)
    chat = client.infer("teacher", _inputs(json.dumps([{"role": "user", "content": "sort: c a b ="}]), chat=True))
    plain_prompt = client.infer("teacher", _inputs("sort: c a b =")).as_numpy("PROMPT_IDS")
    assert len(chat.as_numpy("PROMPT_IDS").reshape(-1)) > len(plain_prompt.reshape(-1)), "chat template applied"
    s1 = client.infer("teacher", _inputs("add: 1+2 =", temperature=1.0, seed=5)).as_numpy("COMPLETION_IDS")
    s2 = client.infer("teacher", _inputs("add: 1+2 =", temperature=1.0, seed=5)).as_numpy("COMPLETION_IDS")
    assert np.array_equal(s1, s2), "a seed fixes sampling"


def test_concurrent_requests_and_a_bad_one(client):
    results: queue.Queue = queue.Queue()
    prompts = [f"reverse: {' '.join('abcdefgh'[i:i + 3])} =" for i in range(8)]
    for i, prompt in enumerate(prompts):
        client.async_infer("teacher", _inputs(prompt), callback=lambda result, error, i=i: results.put((i, result, error)))
    client.async_infer("teacher", _inputs("x", max_new_tokens=100_000), callback=lambda result, error: results.put((-1, result, error)))
    got = dict((i, (r, e)) for i, r, e in (results.get(timeout=120) for _ in range(9)))
    assert all(got[i][1] is None and got[i][0].as_numpy("COMPLETION") is not None for i in range(8))
    assert isinstance(got[-1][1], InferenceServerException)
    assert "MAX_NEW_TOKENS" in got[-1][1].message()


def test_broken_model_dir_is_reported_with_the_server_error(tmp_path):
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    server = TritonServer(MODEL_REPOSITORY, tmp_path / "triton", teacher_model_dir=broken)
    with pytest.raises(LaunchError) as err:
        server.start(timeout=120)
    server.stop()
    assert "has no config.json" in str(err.value)
