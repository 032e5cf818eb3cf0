"""Teacher-inference: prompts in, TeacherOutput (completion, top-k log-probs, identity, lineage) out.

One polled batch becomes concurrent Triton requests (up to `in_flight`), so Triton's dynamic
batcher sees many requests at once. Triton down or slow: `Retry` (the loop backs off, keeps the
consumer in its group, commits nothing). A prompt Triton refuses, or keeps failing on, is
dead-lettered with Triton's message.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import ExitStack

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from distillery.v1 import common_pb2, prompt_pb2, teacher_output_pb2
from services.common import codec
from services.common.config import PROMPTS, TEACHER_OUTPUTS
from services.common.logging import get_logger
from services.common.loop import BaseStage, DeadLetter, Failed, Output, Retry
from services.common.prompts import decode_prompt, params_with_defaults
from services.common.topk import pack
from services.teacher import policy as teacher_policy
from services.teacher.config import TeacherSettings
from services.teacher.triton_client import Generation, TeacherFailure, TeacherUnavailable, TritonTeacher

log = get_logger(__name__)

SERVICE = "teacher"
FINISH = {"stop": teacher_output_pb2.FINISH_REASON_STOP, "length": teacher_output_pb2.FINISH_REASON_LENGTH}


def _now() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


class TeacherStage(BaseStage):
    name = SERVICE

    def __init__(self, settings: TeacherSettings, teacher: TritonTeacher):
        self.settings = settings
        self.teacher = teacher
        self.input_topic = settings.topic(PROMPTS)
        self.output_topic = settings.topic(TEACHER_OUTPUTS)
        self.limits = settings.prompt_limits()
        self.defaults = common_pb2.GenerationParams(
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            logprobs_k=settings.logprobs_k,
        )
        self.policies: dict[str, teacher_policy.TeacherPolicy] = {}
        self._failures: dict[str, int] = {}

    # -- the Stage protocol ------------------------------------------------------------------
    def decode(self, record):
        prompt = decode_prompt(record.value, record.headers, self.limits)
        received = _now()
        return prompt, received

    def process(self, items: Sequence[tuple[object, tuple[prompt_pb2.Prompt, Timestamp]]]) -> list[Output | Failed]:
        requests = [(prompt, params_with_defaults(prompt.params, self.defaults)) for _, (prompt, _) in items]
        try:
            results = self.teacher.generate(requests)
        except TeacherUnavailable as exc:
            raise Retry(str(exc)) from exc
        triton_version = self.teacher.server_version()
        out: list[Output | Failed] = []
        for (record, (prompt, received)), (_, params), result in zip(items, requests, results):
            if isinstance(result, TeacherFailure):
                failed = self._failed(record, prompt, result)
                if failed is None:
                    raise Retry(f"teacher error on {prompt.id}: {result.message}")
                out.append(failed)
                continue
            self._failures.pop(prompt.id, None)
            try:
                message = self.build_output(record, prompt, params, received, result, triton_version)
            except DeadLetter as exc:
                out.append(Failed(record, exc.reason, exc.detail))
                continue
            value, headers = codec.encode(message)
            out.append(Output(self.output_topic, value, key=prompt.id.encode(), headers=headers, source=record))
        return out

    def _failed(self, record, prompt: prompt_pb2.Prompt, failure: TeacherFailure) -> Failed | None:
        if failure.kind == "rejected":
            return Failed(record, "teacher-rejected", failure.message)
        attempts = self._failures.get(prompt.id, 0) + 1
        self._failures[prompt.id] = attempts
        log.warning("teacher_error", prompt_id=prompt.id, attempt=attempts, error=failure.message[:500],
                    partition=record.partition, offset=record.offset)
        if attempts >= self.settings.max_attempts:
            self._failures.pop(prompt.id, None)
            return Failed(record, "teacher-error", f"after {attempts} attempts: {failure.message}")
        return None

    def policy_for(self, model_name: str) -> teacher_policy.TeacherPolicy:
        policy = self.policies.get(model_name)
        if policy is None:
            policy = teacher_policy.check(
                model_name, self.settings.teacher_registry, override=self.settings.teacher_policy_override
            )
            self.policies[model_name] = policy
        return policy

    def build_output(self, record, prompt, params, received, result: Generation, triton_version: str):
        info = result.info
        model_name = info.get("model_name", "")
        try:
            policy = self.policy_for(model_name)
        except teacher_policy.PolicyError as exc:
            # the teacher changed under us to one we may not serve: stop, do not skip prompts
            raise SystemExit(f"teacher policy: {exc}") from exc
        if result.topk_ids.shape[0] != len(result.completion_ids):
            raise DeadLetter("teacher-output-invalid",
                             f"{result.topk_ids.shape[0]} top-k rows for {len(result.completion_ids)} tokens")
        identity = common_pb2.TeacherIdentity(
            model_name=model_name,
            model_version=str(info.get("model_version", "1")),
            revision=str(info.get("revision", "")),
            tokenizer_hash=str(info.get("tokenizer_hash", "")),
            vocab_size=int(info.get("vocab_size", 0)),
            triton_version=triton_version,
            license=policy.license,
            distillation_permitted=policy.distillation_permitted,
            policy_override=policy.override,
            owner=policy.owner,
        )
        if not identity.revision or not identity.tokenizer_hash or not identity.vocab_size:
            raise DeadLetter("lineage-missing", f"teacher reported incomplete identity: {json.dumps(info)[:300]}")
        lineage = common_pb2.Lineage(
            source=prompt.source,
            prompt_license=prompt.license,
            received_at=received,
            generated_at=_now(),
            prompt_topic=record.topic,
            prompt_partition=record.partition,
            prompt_offset=record.offset,
        )
        if prompt.HasField("created_at"):
            lineage.created_at.CopyFrom(prompt.created_at)
        else:
            lineage.created_at.CopyFrom(received)
        return teacher_output_pb2.TeacherOutput(
            prompt_id=prompt.id,
            prompt=prompt,
            completion=result.completion,
            prompt_token_ids=np.asarray(result.prompt_ids, dtype=np.int64).tolist(),
            completion_token_ids=np.asarray(result.completion_ids, dtype=np.int64).tolist(),
            topk=pack(result.topk_ids.astype(np.int64), result.topk_logprobs,
                      temperature=float(info.get("capture_temperature", 1.0))),
            finish_reason=FINISH.get(result.finish_reason, teacher_output_pb2.FINISH_REASON_UNSPECIFIED),
            teacher=identity,
            params=params,
            timings=teacher_output_pb2.Timings(inference_ms=result.inference_ms),
            lineage=lineage,
        )


@retry(
    retry=retry_if_exception_type(TeacherUnavailable),
    wait=wait_exponential(multiplier=0.5, max=10),
    stop=stop_after_delay(900),
    before_sleep=lambda state: log.info("waiting_for_teacher", attempt=state.attempt_number,
                                        error=str(state.outcome.exception())[:300]),
    reraise=True,
)
def _probe(teacher: TritonTeacher) -> dict:
    return teacher.probe()


def make_stage(settings: TeacherSettings, stack: ExitStack) -> TeacherStage:
    """Connect to Triton, learn which teacher it serves and check the teacher policy before the
    first prompt is consumed: a refused teacher stops the service here with PolicyError."""
    teacher = TritonTeacher(settings.triton_url, settings.triton_model, settings.in_flight, settings.request_timeout_s)
    stack.callback(teacher.close)
    stage = TeacherStage(settings, teacher)
    info = _probe(teacher)
    policy = stage.policy_for(info.get("model_name", ""))
    log.info("teacher_policy", model_name=policy.model_name, owner=policy.owner, license=policy.license,
             distillation_permitted=policy.distillation_permitted, override=policy.override,
             revision=info.get("revision"), triton_version=teacher.server_version())
    return stage
