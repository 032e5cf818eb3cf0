"""The teacher as teacher-inference sees it: Triton over gRPC (tritonclient), several requests in
flight so Triton's dynamic batcher fills, errors sorted into "retry later" and "this prompt is bad".
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from distillery.v1 import common_pb2, prompt_pb2
from services.common import metrics
from services.common.logging import get_logger

log = get_logger(__name__)

OUTPUTS = ("COMPLETION", "PROMPT_IDS", "COMPLETION_IDS", "TOPK_IDS", "TOPK_LOGPROBS", "FINISH_REASON", "TEACHER_INFO")
# gRPC status codes that mean "the teacher is not there right now": rewind and retry.
RETRYABLE = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED",
             "StatusCode.CANCELLED", "StatusCode.UNKNOWN", "StatusCode.ABORTED", None}
REJECTED = {"StatusCode.INVALID_ARGUMENT", "StatusCode.OUT_OF_RANGE", "StatusCode.FAILED_PRECONDITION"}


class TeacherUnavailable(Exception):
    """Triton is down, slow, or the model is not loaded: retry the batch later."""


@dataclass
class Generation:
    completion: str
    prompt_ids: np.ndarray
    completion_ids: np.ndarray
    topk_ids: np.ndarray  # [T, k]
    topk_logprobs: np.ndarray  # [T, k]
    finish_reason: str
    info: dict
    inference_ms: float


@dataclass
class TeacherFailure:
    """Triton answered this request with an error that is about the request (or the model)."""

    kind: str  # "rejected" (bad request) or "error" (model failure)
    message: str


def _scalar(name: str, value, dtype: str, np_dtype) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1, 1], dtype)
    tensor.set_data_from_numpy(np.array([[value]], dtype=np_dtype))
    return tensor


def build_inputs(prompt: prompt_pb2.Prompt, params: common_pb2.GenerationParams) -> list[grpcclient.InferInput]:
    if prompt.WhichOneof("input") == "chat":
        text = json.dumps([{"role": m.role, "content": m.content} for m in prompt.chat.messages], ensure_ascii=False)
        is_chat = True
    else:
        text, is_chat = prompt.text, False
    inputs = [
        _scalar("PROMPT", text.encode("utf-8"), "BYTES", object),
        _scalar("IS_CHAT", is_chat, "BOOL", bool),
        _scalar("MAX_NEW_TOKENS", params.max_new_tokens, "INT32", np.int32),
        _scalar("TEMPERATURE", params.temperature, "FP32", np.float32),
        _scalar("TOP_P", params.top_p, "FP32", np.float32),
        _scalar("LOGPROBS_K", params.logprobs_k, "INT32", np.int32),
    ]
    if params.HasField("seed"):
        inputs.append(_scalar("SEED", params.seed % 2**63, "INT64", np.int64))
    return inputs


def _text(array: np.ndarray) -> str:
    value = array.reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TritonTeacher:
    def __init__(self, url: str, model: str, in_flight: int, timeout_s: float, service: str = "teacher"):
        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        self.service = service
        self.client = grpcclient.InferenceServerClient(url=url)
        self.pool = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="triton")
        self._server_version: str | None = None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()

    def server_version(self) -> str:
        if self._server_version is None:
            try:
                self._server_version = self.client.get_server_metadata(client_timeout=10).version
            except InferenceServerException as exc:
                raise TeacherUnavailable(f"Triton at {self.url}: {exc.message()}") from exc
        return self._server_version

    def ready(self) -> bool:
        try:
            return bool(self.client.is_model_ready(self.model, client_timeout=5))
        except InferenceServerException:
            return False

    def probe(self) -> dict:
        """The teacher's identity (TEACHER_INFO), from a one-token request."""
        result = self._one(prompt_pb2.Prompt(text="identity probe"),
                           common_pb2.GenerationParams(max_new_tokens=1, temperature=0.0, top_p=1.0, logprobs_k=1))
        if isinstance(result, TeacherFailure):
            raise TeacherUnavailable(f"identity probe failed: {result.message}")
        return result.info

    def _one(self, prompt: prompt_pb2.Prompt, params: common_pb2.GenerationParams) -> Generation | TeacherFailure:
        started = time.monotonic()
        metrics.IN_FLIGHT.labels(self.service).inc()
        try:
            result = self.client.infer(
                self.model,
                build_inputs(prompt, params),
                outputs=[grpcclient.InferRequestedOutput(name) for name in OUTPUTS],
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as exc:
            status = exc.status()
            if status in REJECTED:
                return TeacherFailure("rejected", exc.message() or str(exc))
            if status in RETRYABLE or "not ready" in (exc.message() or "") or "unknown model" in (exc.message() or ""):
                raise TeacherUnavailable(f"{status}: {exc.message()}") from exc
            return TeacherFailure("error", f"{status}: {exc.message()}")
        finally:
            metrics.IN_FLIGHT.labels(self.service).dec()
        info = json.loads(_text(result.as_numpy("TEACHER_INFO")))
        topk_ids = result.as_numpy("TOPK_IDS")
        topk_logprobs = result.as_numpy("TOPK_LOGPROBS")
        return Generation(
            completion=_text(result.as_numpy("COMPLETION")),
            prompt_ids=result.as_numpy("PROMPT_IDS").reshape(-1),
            completion_ids=result.as_numpy("COMPLETION_IDS").reshape(-1),
            topk_ids=topk_ids.reshape(-1, topk_ids.shape[-1]) if topk_ids.size else topk_ids.reshape(0, 0),
            topk_logprobs=topk_logprobs.reshape(-1, topk_logprobs.shape[-1]) if topk_logprobs.size else topk_logprobs.reshape(0, 0),
            finish_reason=_text(result.as_numpy("FINISH_REASON")),
            info=info,
            inference_ms=(time.monotonic() - started) * 1000,
        )

    def generate(self, requests: list[tuple[prompt_pb2.Prompt, common_pb2.GenerationParams]]) -> list[Generation | TeacherFailure]:
        """All requests at once (up to `in_flight` concurrently); raises TeacherUnavailable if any
        request found Triton unavailable, so the caller retries the whole batch."""
        futures = [self.pool.submit(self._one, prompt, params) for prompt, params in requests]
        results, unavailable = [], None
        for future in futures:
            try:
                results.append(future.result())
            except TeacherUnavailable as exc:
                unavailable = exc
        if unavailable is not None:
            self._server_version = None  # a redeployed Triton may be another version
            raise unavailable
        return results
