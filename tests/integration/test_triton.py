"""The teacher on the real Triton server (pytriton's tritonserver), called with tritonclient gRPC."""

from __future__ import annotations

import json
import queue
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from services.stack.errors import LaunchError
from services.stack.models import tokenizer_hash, weights_hash
from services.stack.triton import MODEL_REPOSITORY, TritonServer

pytestmark = pytest.mark.integration

TIMEOUT_S = 120  # per call: generous for a loaded CI machine, never a timing assertion


def _inputs(prompt: str, chat: bool = False, max_new_tokens: int | None = 12, k: int | None = 5,
            temperature: float | None = None, seed: int | None = None, top_p: float | None = None):
    spec = [("PROMPT", prompt.encode(), "BYTES", np.object_), ("IS_CHAT", chat, "BOOL", np.bool_),
            ("MAX_NEW_TOKENS", max_new_tokens, "INT32", np.int32), ("LOGPROBS_K", k, "INT32", np.int32),
            ("TEMPERATURE", temperature, "FP32", np.float32), ("TOP_P", top_p, "FP32", np.float32),
            ("SEED", seed, "INT64", np.int64)]
    tensors = []
    for name, value, dtype, np_dtype in spec:
        if value is None:
            continue  # every input but PROMPT is optional
        tensor = grpcclient.InferInput(name, [1, 1], dtype)
        tensor.set_data_from_numpy(np.array([[value]], dtype=np_dtype))
        tensors.append(tensor)
    return tensors


def _text(result, name: str) -> str:
    return result.as_numpy(name).reshape(-1)[0].decode()


@pytest.fixture(scope="module")
def client(triton_server):
    c = grpcclient.InferenceServerClient(triton_server.grpc_url)
    yield c
    c.close()


def _infer(client, *args, **kwargs):
    return client.infer("teacher", _inputs(*args, **kwargs), client_timeout=TIMEOUT_S)


def test_text_prompt_returns_completion_with_topk_per_token(client, model_dirs):
    result = _infer(client, "sort: 3 1 2 =", k=5)
    prompt_ids = result.as_numpy("PROMPT_IDS")
    ids = result.as_numpy("COMPLETION_IDS")
    topk_ids, topk_lp = result.as_numpy("TOPK_IDS"), result.as_numpy("TOPK_LOGPROBS")
    assert prompt_ids.shape == (1, len("sort: 3 1 2 =") + 1), "bos + one token per character"
    t = ids.shape[1]
    assert 1 <= t <= 12
    assert topk_ids.shape == topk_lp.shape == (1, t, 5)
    assert topk_ids.dtype == np.int32 and topk_lp.dtype == np.float32
    topk_ids, topk_lp = topk_ids[0], topk_lp[0]
    assert (topk_lp <= 0).all()
    assert (np.diff(topk_lp, axis=1) <= 1e-6).all(), "best first"
    assert (np.logaddexp.reduce(topk_lp, axis=1) <= 1e-4).all(), "top-k mass cannot exceed 1"
    assert (topk_ids[:, 0] == ids[0]).all(), "greedy takes the top-1 token of the same forward pass"
    finish = _text(result, "FINISH_REASON")
    assert finish in ("stop", "length")
    info = json.loads(_text(result, "TEACHER_INFO"))
    assert info["revision"] == weights_hash(model_dirs[0]) and info["revision"].startswith("sha256:")
    assert info["tokenizer_hash"] == tokenizer_hash(model_dirs[0])
    assert info["vocab_size"] > 0 and info["capture_temperature"] == 1.0
    assert info["model_name"] == "distillery-tiny-teacher"
    assert info["model_dir"] == str(model_dirs[0].resolve())
    assert topk_ids.max() < info["vocab_size"]


def test_only_prompt_is_required_and_defaults_apply(client):
    result = client.infer("teacher", _inputs("reverse: a b =", max_new_tokens=None, k=None),
                          client_timeout=TIMEOUT_S)
    assert result.as_numpy("TOPK_IDS").shape[2] == 20, "LOGPROBS_K defaults to 20"
    assert 1 <= result.as_numpy("COMPLETION_IDS").shape[1] <= 64


def test_greedy_is_deterministic(client):
    runs = [_infer(client, "add: 12 7 =") for _ in range(3)]
    ids = [r.as_numpy("COMPLETION_IDS") for r in runs]
    assert all(np.array_equal(ids[0], other) for other in ids[1:])
    lps = [r.as_numpy("TOPK_LOGPROBS") for r in runs]
    assert all(np.allclose(lps[0], other, atol=1e-5) for other in lps[1:])


def test_seeded_sampling_repeats_and_respects_topk_shapes(client):
    a = _infer(client, "reverse: q w e =", temperature=1.5, seed=7, max_new_tokens=10)
    b = _infer(client, "reverse: q w e =", temperature=1.5, seed=7, max_new_tokens=10)
    assert np.array_equal(a.as_numpy("COMPLETION_IDS"), b.as_numpy("COMPLETION_IDS"))
    t = a.as_numpy("COMPLETION_IDS").shape[1]
    assert a.as_numpy("TOPK_LOGPROBS").shape == (1, t, 5)


def test_chat_prompt_uses_the_chat_template(client):
    messages = [{"role": "user", "content": "sort: 2 1 ="}]
    chat = _infer(client, json.dumps(messages), chat=True)
    plain = _infer(client, "sort: 2 1 =")
    chat_ids, plain_ids = chat.as_numpy("PROMPT_IDS")[0], plain.as_numpy("PROMPT_IDS")[0]
    assert len(chat_ids) == len(plain_ids) + 2, "role tokens <user> and <assistant> around the text"
    assert chat.as_numpy("COMPLETION_IDS").shape[1] >= 1
    assert chat.as_numpy("TOPK_IDS").shape[1] == chat.as_numpy("COMPLETION_IDS").shape[1]


def test_concurrent_requests_and_a_bad_one_in_the_same_batches(client):
    results: queue.Queue = queue.Queue()
    prompts = [f"reverse: {' '.join('abcdefghij'[i:i + 3])} =" for i in range(8)]
    for i, prompt in enumerate(prompts):
        client.async_infer("teacher", _inputs(prompt, temperature=0.0 if i % 2 else 0.8, seed=i),
                           callback=lambda result, error, i=i: results.put((i, result, error)), client_timeout=TIMEOUT_S)
    client.async_infer("teacher", _inputs("sort: 1 2 =", max_new_tokens=100_000),
                       callback=lambda result, error: results.put(("too-long", result, error)), client_timeout=TIMEOUT_S)
    client.async_infer("teacher", _inputs("not json", chat=True),
                       callback=lambda result, error: results.put(("bad-chat", result, error)), client_timeout=TIMEOUT_S)
    got = {}
    for _ in range(10):
        key, result, error = results.get(timeout=TIMEOUT_S)
        got[key] = (result, error)
    for i in range(8):
        result, error = got[i]
        assert error is None, error
        assert result.as_numpy("TOPK_IDS").shape[1] == result.as_numpy("COMPLETION_IDS").shape[1]
    for key, needle in (("too-long", "MAX_NEW_TOKENS"), ("bad-chat", "IS_CHAT")):
        result, error = got[key]
        assert result is None and isinstance(error, InferenceServerException)
        assert needle in error.message()


def test_greedy_answers_do_not_depend_on_batch_company(client):
    """A greedy request alone and the same request amid others give the same tokens."""
    alone = _infer(client, "sort: 5 3 =").as_numpy("COMPLETION_IDS")
    results: queue.Queue = queue.Queue()
    for i, prompt in enumerate(["sort: 5 3 =", "reverse: a b c d =", "add: 1 2 =", "sort: 9 8 7 6 5 ="]):
        client.async_infer("teacher", _inputs(prompt), callback=lambda result, error, i=i: results.put((i, result, error)),
                           client_timeout=TIMEOUT_S)
    got = dict((i, (r, e)) for i, r, e in (results.get(timeout=TIMEOUT_S) for _ in range(4)))
    assert got[0][1] is None
    assert np.array_equal(got[0][0].as_numpy("COMPLETION_IDS"), alone)


def test_served_teacher_matches_the_model_run_locally(client, model_dirs):
    """Same greedy tokens and top-k log-probs as transformers gives for the folder directly."""
    import torch
    from transformers import AutoModelForCausalLM

    from services.stack.models import encode_prompt, load_tokenizer

    teacher_dir = model_dirs[0]
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    tokenizer = load_tokenizer(teacher_dir)
    prompt = "reverse: x y z ="
    result = _infer(client, prompt, k=4, max_new_tokens=8)
    ids = encode_prompt(tokenizer, prompt)
    assert result.as_numpy("PROMPT_IDS")[0].tolist() == ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             return_dict_in_generate=True, output_logits=True)
    local_ids = out.sequences[0, len(ids):].tolist()
    served_ids = result.as_numpy("COMPLETION_IDS")[0].tolist()
    assert served_ids == local_ids[: len(served_ids)]
    local_lp = torch.log_softmax(torch.stack(out.logits, dim=1)[0], dim=-1)
    top_lp, top_ids = torch.topk(local_lp[: len(served_ids)], k=4, dim=-1)
    assert np.array_equal(result.as_numpy("TOPK_IDS")[0], top_ids.numpy())
    assert np.allclose(result.as_numpy("TOPK_LOGPROBS")[0], top_lp.numpy(), atol=1e-4)
    answer = tokenizer.decode([i for i in served_ids if i != tokenizer.eos_token_id], skip_special_tokens=True)
    assert _text(result, "COMPLETION") == answer


def _metric(metrics_url: str, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(metrics_url, timeout=30) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and 'model="teacher"' in line)


def test_queued_requests_share_executions(client, triton_server):
    """The dynamic batcher hands execute() several requests at once (exec count < request count)."""
    if not hasattr(triton_server, "metrics_url"):
        pytest.skip("an external Triton: its metrics port is unknown")
    requests_before = _metric(triton_server.metrics_url, "nv_inference_count")
    execs_before = _metric(triton_server.metrics_url, "nv_inference_exec_count")
    results: queue.Queue = queue.Queue()
    for i in range(16):
        client.async_infer("teacher", _inputs(f"sort: {i % 10} 3 =", max_new_tokens=8),
                           callback=lambda result, error: results.put(error), client_timeout=TIMEOUT_S)
    assert [results.get(timeout=TIMEOUT_S) for _ in range(16)] == [None] * 16
    deadline = time.monotonic() + 30  # the counters may trail the responses a little
    while (requests := _metric(triton_server.metrics_url, "nv_inference_count") - requests_before) < 16:
        assert time.monotonic() < deadline, f"metrics show {requests} of 16 requests"
        time.sleep(0.2)
    execs = _metric(triton_server.metrics_url, "nv_inference_exec_count") - execs_before
    assert requests == 16 and execs < requests


def test_broken_model_dir_raises_launch_error_with_the_server_error(tmp_path):
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    server = TritonServer(MODEL_REPOSITORY, tmp_path / "triton", teacher_model_dir=broken)
    try:
        with pytest.raises(LaunchError) as err:
            server.start(timeout=170)
    finally:
        server.stop()
    message = str(err.value)
    assert "is not a Hugging Face model folder (no config.json)" in message, message
    assert str(broken) in message
    assert not server.running
