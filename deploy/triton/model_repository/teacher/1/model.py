"""The Distillery teacher on Triton's python backend: any Hugging Face causal-LM folder.

execute() receives every request the dynamic batcher queued and answers them with as few batched
`generate` calls as possible: all greedy requests in one left-padded batch, sampled requests
grouped by (temperature, top_p) and run one seed at a time (a seed fixes one request's sampling).
The top-k log-probabilities of each generated token come from the same forward pass that chose it
(`output_logits`), as log_softmax of the raw logits (capture temperature 1.0).
A request with bad input gets an error response; the others in the batch are still answered.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# The stub's embedded interpreter ignores PYTHONPATH (seen with nvidia-pytriton 0.7.0's stub):
# put its entries on sys.path ourselves, so torch, transformers and the project import.
for _entry in reversed([p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]):
    if _entry not in sys.path:
        sys.path.insert(0, _entry)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_LOGPROBS_K = 20


class BadRequest(ValueError):
    pass


def _error(message: str, invalid: bool = True):
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid else "INTERNAL", None)
    return pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)


def _scalar(request, name: str, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    value = tensor.as_numpy().reshape(-1)
    if value.size != 1:
        raise BadRequest(f"{name} must hold one value, got {value.size}")
    return value[0]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        model_dir = os.environ.get("DISTILL_TEACHER_MODEL_DIR") or params.get("model_dir", "")
        if not model_dir:
            raise pb_utils.TritonModelException("no teacher model folder: set DISTILL_TEACHER_MODEL_DIR or model_dir")
        path = Path(model_dir)
        if not path.is_absolute():
            path = Path(args["model_repository"]) / path
        if not (path / "config.json").exists():
            raise pb_utils.TritonModelException(f"teacher model folder {path} has no config.json")
        threads = int(os.environ.get("DISTILL_TEACHER_NUM_THREADS") or params.get("num_threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.bfloat16 if self.device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(self.device).eval()
        self.max_new_tokens_limit = int(params.get("max_new_tokens_limit") or 512)
        self.context = int(getattr(self.model.config, "n_positions", 0) or getattr(
            self.model.config, "max_position_embeddings", 0) or 1 << 30)
        from services.stack.models import model_name, tokenizer_hash, weights_hash

        self.info = json.dumps({
            "model_name": params.get("model_name") or model_name(path),
            "model_version": str(args.get("model_version", "1")),
            "revision": "sha256:" + weights_hash(path),
            "tokenizer_hash": "sha256:" + tokenizer_hash(path),
            "vocab_size": len(self.tokenizer),
            "model_dir": str(path),
            "capture_temperature": 1.0,
            "device": self.device,
        })

    # -- requests ----------------------------------------------------------------------------
    def _parse(self, request) -> dict:
        raw = _scalar(request, "PROMPT", None)
        if raw is None:
            raise BadRequest("PROMPT is required")
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        if bool(_scalar(request, "IS_CHAT", False)):
            try:
                messages = json.loads(text)
            except json.JSONDecodeError as exc:
                raise BadRequest(f"IS_CHAT is set but PROMPT is not a JSON list of messages: {exc}") from exc
            if self.tokenizer.chat_template:
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                    ids = ids["input_ids"]
            else:  # no template: the conversation as plain text
                ids = self.tokenizer("\n".join(f"{m['role']}: {m['content']}" for m in messages))["input_ids"]
        else:
            ids = self.tokenizer(text)["input_ids"]
        if not ids:
            raise BadRequest("PROMPT is empty after tokenisation")
        max_new = int(_scalar(request, "MAX_NEW_TOKENS", 0)) or DEFAULT_MAX_NEW_TOKENS
        k = int(_scalar(request, "LOGPROBS_K", 0)) or DEFAULT_LOGPROBS_K
        temperature = float(_scalar(request, "TEMPERATURE", 0.0))
        top_p = float(_scalar(request, "TOP_P", 1.0)) or 1.0
        if not 1 <= max_new <= self.max_new_tokens_limit:
            raise BadRequest(f"MAX_NEW_TOKENS {max_new} not in [1, {self.max_new_tokens_limit}]")
        if not 1 <= k <= len(self.tokenizer):
            raise BadRequest(f"LOGPROBS_K {k} not in [1, {len(self.tokenizer)}]")
        if not (0.0 <= temperature <= 10.0) or not (0.0 < top_p <= 1.0):
            raise BadRequest(f"TEMPERATURE {temperature} or TOP_P {top_p} out of range")
        if len(ids) + max_new > self.context:
            if len(ids) >= self.context:
                raise BadRequest(f"prompt has {len(ids)} tokens; the teacher's context is {self.context}")
            max_new = self.context - len(ids)
        seed = _scalar(request, "SEED", None)
        return {"ids": list(ids), "max_new": max_new, "k": k, "temperature": temperature, "top_p": top_p,
                "seed": None if seed is None else int(seed)}

    def execute(self, requests):
        responses: list = [None] * len(requests)
        parsed = {}
        for i, request in enumerate(requests):
            try:
                parsed[i] = self._parse(request)
            except (BadRequest, ValueError, KeyError, TypeError) as exc:
                responses[i] = pb_utils.InferenceResponse(error=_error(str(exc)))
        groups: dict[tuple, list[int]] = {}
        for i, p in parsed.items():
            if p["temperature"] == 0.0:
                key = ("greedy",)
            else:
                key = ("sample", p["temperature"], p["top_p"], p["seed"] if p["seed"] is not None else i)
            groups.setdefault(key, []).append(i)
        for key, members in groups.items():
            try:
                for i, response in zip(members, self._generate([parsed[i] for i in members], key)):
                    responses[i] = response
            except Exception as exc:  # noqa: BLE001 - a failed batch answers its requests with the error
                print(f"teacher generate failed: {exc!r}", file=sys.stderr)
                for i in members:
                    responses[i] = pb_utils.InferenceResponse(error=_error(f"generate failed: {exc}", invalid=False))
        return responses

    @torch.inference_mode()
    def _generate(self, batch: list[dict], key: tuple) -> list:
        pad = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        width = max(len(p["ids"]) for p in batch)
        input_ids = torch.tensor([[pad] * (width - len(p["ids"])) + p["ids"] for p in batch], device=self.device)
        mask = torch.tensor([[0] * (width - len(p["ids"])) + [1] * len(p["ids"]) for p in batch], device=self.device)
        sample = key[0] == "sample"
        kwargs = {}
        if sample:
            torch.manual_seed(key[3] % (2**63))
            kwargs = {"do_sample": True, "temperature": key[1], "top_p": key[2], "top_k": 0}
        else:
            kwargs = {"do_sample": False}
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max(p["max_new"] for p in batch),
            pad_token_id=pad,
            eos_token_id=eos,
            return_dict_in_generate=True,
            output_logits=True,
            **kwargs,
        )
        generated = out.sequences[:, width:]
        logprobs = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)  # [B, steps, V]
        k_max = max(p["k"] for p in batch)
        top_lp, top_ids = torch.topk(logprobs, k=min(k_max, logprobs.shape[-1]), dim=-1)
        responses = []
        for row, p in enumerate(batch):
            ids = generated[row, : p["max_new"]].tolist()
            finish = "length"
            if eos is not None and eos in ids:
                ids = ids[: ids.index(eos) + 1]
                finish = "stop"
            t = len(ids)
            text = self.tokenizer.decode([i for i in ids if i != eos], skip_special_tokens=True)
            tensors = [
                pb_utils.Tensor("COMPLETION", np.array([[text.encode("utf-8")]], dtype=object)),
                pb_utils.Tensor("PROMPT_IDS", np.array([p["ids"]], dtype=np.int32)),
                pb_utils.Tensor("COMPLETION_IDS", np.array([ids], dtype=np.int32)),
                pb_utils.Tensor("TOPK_IDS", top_ids[row, :t, : p["k"]].cpu().numpy().astype(np.int32)[None]),
                pb_utils.Tensor("TOPK_LOGPROBS", top_lp[row, :t, : p["k"]].cpu().numpy().astype(np.float32)[None]),
                pb_utils.Tensor("FINISH_REASON", np.array([[finish.encode()]], dtype=object)),
                pb_utils.Tensor("TEACHER_INFO", np.array([[self.info.encode()]], dtype=object)),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self):
        self.model = None
