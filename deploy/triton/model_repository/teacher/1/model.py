"""The Distillery teacher on Triton's python backend: any Hugging Face causal-LM folder.

`execute()` receives every request the dynamic batcher queued and answers them all with ONE
left-padded, batched `generate` call, whatever their parameters:
- per-request sampling: a logits processor samples each sampled row (temperature, top_p) with its
  own `torch.Generator` seeded by the request's SEED (so a seed fixes that request's sampling
  whatever else shares the batch) and leaves only that token; greedy rows are left untouched, and
  `generate` itself runs greedy;
- per-request length: a stopping criterion ends each row at its own MAX_NEW_TOKENS;
- the top-k log-probabilities of each generated token are log_softmax of the raw logits of the
  forward pass that chose it (`output_logits`, capture temperature 1.0).
A request with bad input gets an error response (pb_utils.TritonError); the others are answered.

Identity (TEACHER_INFO) hashes come from `services.stack.models` (the repository is on
PYTHONPATH: the local launcher sets it, containers must too), so the trainer and the teacher
compute them with the same code.
"""

from __future__ import annotations

import json
import time
import os
import sys
from pathlib import Path

# The stub's embedded interpreter ignores PYTHONPATH (nvidia-pytriton 0.7.0's stub): put its
# entries on sys.path ourselves, so torch, transformers and the project import.
for _entry in reversed([p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]):
    if _entry not in sys.path:
        sys.path.insert(0, _entry)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList  # noqa: E402
from transformers import StoppingCriteria, StoppingCriteriaList  # noqa: E402

from services.stack.models import model_name, tokenizer_hash, weights_hash  # noqa: E402

DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_LOGPROBS_K = 20
MAX_NEW_TOKENS_LIMIT = 512
CAPTURE_TEMPERATURE = 1.0


class BadRequest(ValueError):
    """A request whose inputs cannot be served; answered with INVALID_ARG."""


def _error(message: str, invalid: bool = True):
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid else "INTERNAL", None)
    return pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)


def _scalar(request, name: str, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    value = tensor.as_numpy().reshape(-1)
    if value.size != 1:
        raise BadRequest(f"{name} must hold exactly one value, got {value.size}")
    return value[0]


class PerRowSampler(LogitsProcessor):
    """Samples the rows that asked for sampling, each with its own generator, temperature and
    top_p, by leaving only the sampled token finite; greedy rows pass unchanged."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, p in enumerate(self.rows):
            if p["temperature"] == 0.0:
                continue
            probs = torch.softmax(scores[row].float() / p["temperature"], dim=-1)
            if p["top_p"] < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                # keep the smallest prefix whose mass reaches top_p (always the best token)
                drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= p["top_p"]
                sorted_probs[drop] = 0.0
                probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
            token = torch.multinomial(probs.cpu(), 1, generator=p["generator"]).item()
            chosen = torch.full_like(scores[row], float("-inf"))
            chosen[token] = 0.0
            scores[row] = chosen
        return scores


class PerRowLength(StoppingCriteria):
    """Ends each row after its own number of new tokens."""

    def __init__(self, prompt_width: int, max_new: list[int], device):
        self.prompt_width = prompt_width
        self.max_new = torch.tensor(max_new, device=device)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return (input_ids.shape[1] - self.prompt_width) >= self.max_new


class TritonPythonModel:
    def initialize(self, args):
        # DISTILL_TEACHER_DELAY_MS: added latency per execute(), to stand in for a remote teacher
        self.delay_s = float(os.environ.get("DISTILL_TEACHER_DELAY_MS") or 0) / 1000
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        model_dir = params.get("model_dir") or os.environ.get("DISTILL_TEACHER_MODEL_DIR", "")
        if not model_dir:
            raise pb_utils.TritonModelException(
                "teacher: no model folder: set the model_dir parameter or DISTILL_TEACHER_MODEL_DIR")
        path = Path(model_dir)
        if not path.is_absolute():
            path = Path(args["model_repository"]) / path
        if not (path / "config.json").is_file():
            raise pb_utils.TritonModelException(
                f"teacher: {path} is not a Hugging Face model folder (no config.json)")
        threads = int(os.environ.get("DISTILL_TEACHER_NUM_THREADS") or params.get("num_threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(str(path)).to(self.device).eval()
        self.max_new_tokens_limit = min(int(params.get("max_new_tokens_limit") or MAX_NEW_TOKENS_LIMIT),
                                        MAX_NEW_TOKENS_LIMIT)
        config_ = self.model.config
        self.context = int(getattr(config_, "n_positions", 0) or getattr(config_, "max_position_embeddings", 0)
                           or 1 << 30)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.info = json.dumps({
            "model_name": params.get("model_name") or model_name(path),
            "model_version": str(args.get("model_version", "1")),
            "revision": weights_hash(path),
            "tokenizer_hash": tokenizer_hash(path),
            "vocab_size": self.vocab_size,
            "model_dir": str(path),
            "capture_temperature": CAPTURE_TEMPERATURE,
            "device": self.device,
        }, sort_keys=True).encode("utf-8")

    # -- requests ----------------------------------------------------------------------------
    def _prompt_ids(self, text: str, chat: bool) -> list[int]:
        if not chat:
            return list(self.tokenizer(text)["input_ids"])
        try:
            messages = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"IS_CHAT is set but PROMPT is not JSON: {exc}") from exc
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise BadRequest('IS_CHAT is set but PROMPT is not a JSON list of {"role", "content"} messages')
        if self.tokenizer.chat_template:
            rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer("\n".join(f"{m['role']}: {m['content']}" for m in messages))["input_ids"])

    def _parse(self, request) -> dict:
        raw = _scalar(request, "PROMPT", None)
        if raw is None:
            raise BadRequest("PROMPT is required")
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        ids = self._prompt_ids(text, bool(_scalar(request, "IS_CHAT", False)))
        if not ids:
            raise BadRequest("PROMPT is empty after tokenisation")
        max_new = int(_scalar(request, "MAX_NEW_TOKENS", 0)) or DEFAULT_MAX_NEW_TOKENS
        k = int(_scalar(request, "LOGPROBS_K", 0)) or DEFAULT_LOGPROBS_K
        temperature = float(_scalar(request, "TEMPERATURE", 0.0))
        top_p = float(_scalar(request, "TOP_P", 1.0)) or 1.0
        if not 1 <= max_new <= self.max_new_tokens_limit:
            raise BadRequest(f"MAX_NEW_TOKENS must be in [1, {self.max_new_tokens_limit}], got {max_new}")
        if not 1 <= k <= self.vocab_size:
            raise BadRequest(f"LOGPROBS_K must be in [1, {self.vocab_size}], got {k}")
        if not np.isfinite(temperature) or temperature < 0.0:
            raise BadRequest(f"TEMPERATURE must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise BadRequest(f"TOP_P must be in (0, 1], got {top_p}")
        if len(ids) >= self.context:
            raise BadRequest(f"prompt has {len(ids)} tokens; the teacher's context is {self.context}")
        max_new = min(max_new, self.context - len(ids))  # the context ends it: FINISH_REASON "length"
        seed = _scalar(request, "SEED", None)
        generator = None
        if temperature > 0.0:
            generator = torch.Generator()
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(int(seed) % (1 << 63))
        return {"ids": ids, "max_new": max_new, "k": k, "temperature": temperature, "top_p": top_p,
                "generator": generator}

    def execute(self, requests):
        if self.delay_s:  # a remote-like teacher (benchmarks): waiting, not computing, per batch
            time.sleep(self.delay_s)
        responses: list = [None] * len(requests)
        batch: list[tuple[int, dict]] = []
        for i, request in enumerate(requests):
            try:
                batch.append((i, self._parse(request)))
            except (BadRequest, ValueError, TypeError, UnicodeDecodeError) as exc:
                responses[i] = pb_utils.InferenceResponse(error=_error(str(exc)))
        if batch:
            try:
                for (i, _), response in zip(batch, self._generate([p for _, p in batch])):
                    responses[i] = response
            except Exception as exc:  # noqa: BLE001 - a failed batch answers each of its requests
                pb_utils.Logger.log_error(f"teacher: generate failed: {exc!r}")
                for i, _ in batch:
                    responses[i] = pb_utils.InferenceResponse(error=_error(f"generate failed: {exc}", False))
        return responses

    @torch.inference_mode()
    def _generate(self, batch: list[dict]) -> list:
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        width = max(len(p["ids"]) for p in batch)
        input_ids = torch.tensor([[pad] * (width - len(p["ids"])) + p["ids"] for p in batch], device=self.device)
        mask = torch.tensor([[0] * (width - len(p["ids"])) + [1] * len(p["ids"]) for p in batch],
                            device=self.device)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            do_sample=False,  # sampling, where asked, happens per row in PerRowSampler
            max_new_tokens=max(p["max_new"] for p in batch),
            logits_processor=LogitsProcessorList([PerRowSampler(batch)]),
            stopping_criteria=StoppingCriteriaList([PerRowLength(width, [p["max_new"] for p in batch],
                                                                 self.device)]),
            pad_token_id=pad,
            eos_token_id=eos,
            return_dict_in_generate=True,
            output_logits=True,
            output_scores=False,
        )
        generated = out.sequences[:, width:]
        logprobs = torch.log_softmax(torch.stack(out.logits, dim=1).float() / CAPTURE_TEMPERATURE, dim=-1)
        top_lp, top_ids = torch.topk(logprobs, k=min(max(p["k"] for p in batch), logprobs.shape[-1]), dim=-1)
        top_lp, top_ids = top_lp.cpu().numpy(), top_ids.cpu().numpy()
        responses = []
        for row, p in enumerate(batch):
            ids = generated[row, : p["max_new"]].tolist()
            finish = "length"
            if eos is not None and eos in ids:
                ids = ids[: ids.index(eos) + 1]  # the eos stays: its log-prob is part of the target
                finish = "stop"
            t = len(ids)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            # every output carries the request's batch dimension (1) first
            tensors = [
                pb_utils.Tensor("COMPLETION", np.array([[text.encode("utf-8")]], dtype=np.object_)),
                pb_utils.Tensor("PROMPT_IDS", np.array([p["ids"]], dtype=np.int32)),
                pb_utils.Tensor("COMPLETION_IDS", np.array([ids], dtype=np.int32)),
                pb_utils.Tensor("TOPK_IDS", np.ascontiguousarray(top_ids[None, row, :t, : p["k"]], dtype=np.int32)),
                pb_utils.Tensor("TOPK_LOGPROBS",
                                np.ascontiguousarray(top_lp[None, row, :t, : p["k"]], dtype=np.float32)),
                pb_utils.Tensor("FINISH_REASON", np.array([[finish.encode()]], dtype=np.object_)),
                pb_utils.Tensor("TEACHER_INFO", np.array([[self.info]], dtype=np.object_)),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self):
        self.model = None
