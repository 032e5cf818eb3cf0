"""Putting prompts on `distill.prompts`: validation up front, idempotent keyed sends, a summary.

The one code path behind `distill submit`, the gRPC PromptService and the SDK's `Client.submit`.
A prompt that breaks a rule is rejected with its reason and never sent; an accepted prompt is
acknowledged by the broker (acks=all) before it is counted as accepted.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from kafka import KafkaProducer
from kafka.errors import MessageSizeTooLargeError

from distillery.v1 import prompt_pb2, services_pb2
from services.common import codec, metrics
from services.common.config import PROMPTS, CommonSettings
from services.common.logging import get_logger
from services.common.prompts import InvalidPrompt, normalise, prompt_from_json, prompt_from_json_bytes

log = get_logger(__name__)

SERVICE = "producer"


def parse_line(line: str) -> prompt_pb2.Prompt:
    """One JSONL line -> Prompt (the JSON shape of DESIGN.md s2)."""
    return prompt_from_json_bytes(line.encode("utf-8", "surrogatepass"))


class PromptSubmitter:
    """Validates and sends prompts with the project's Kafka wiring."""

    def __init__(self, settings: CommonSettings, producer: KafkaProducer, chunk: int = 500):
        self.settings = settings
        self.producer = producer
        self.topic = settings.topic(PROMPTS)
        self.limits = settings.prompt_limits()
        self.chunk = chunk

    def submit(self, prompts: Iterable[prompt_pb2.Prompt | dict | str | InvalidPrompt]) -> services_pb2.SubmitSummary:
        """Send every valid prompt; return accepted/rejected counts with reasons. Items may be
        Prompt messages, JSON-shaped dicts, JSONL lines, or an InvalidPrompt already raised by a
        parser upstream (counted as a rejection at its position)."""
        summary = services_pb2.SubmitSummary()
        pending: list[tuple[Any, str]] = []
        for index, item in enumerate(prompts):
            try:
                prompt = self._prompt(item)
            except InvalidPrompt as exc:
                summary.rejected += 1
                summary.rejections.add(index=index, id=_id_of(item), reason=f"{exc.reason}: {exc.detail}")
                metrics.ERRORS.labels(SERVICE, exc.reason).inc()
                log.info("prompt_rejected", index=index, reason=exc.reason, detail=exc.detail[:300])
                continue
            value, headers = codec.encode(prompt)
            try:
                future = self.producer.send(self.topic, key=prompt.id.encode(), value=value, headers=headers)
            except MessageSizeTooLargeError as exc:  # refused before sending: nothing was sent
                summary.rejected += 1
                summary.rejections.add(index=index, id=prompt.id, reason=f"prompt-too-large: {exc}")
                metrics.ERRORS.labels(SERVICE, "prompt-too-large").inc()
                continue
            pending.append((future, prompt.id))
            if len(pending) >= self.chunk:
                self._settle(pending, summary)
        self._settle(pending, summary)
        log.info("prompts_submitted", topic=self.topic, accepted=summary.accepted, rejected=summary.rejected)
        return summary

    def _prompt(self, item) -> prompt_pb2.Prompt:
        if isinstance(item, InvalidPrompt):
            raise item
        if isinstance(item, str):
            prompt = parse_line(item)
        elif isinstance(item, dict):
            prompt = prompt_from_json(item)
        else:
            prompt = prompt_pb2.Prompt()
            prompt.CopyFrom(item)
        prompt = normalise(prompt, self.limits)
        if not prompt.HasField("created_at"):
            now = Timestamp()
            now.GetCurrentTime()
            prompt.created_at.CopyFrom(now)
        return prompt

    def _settle(self, pending: list, summary: services_pb2.SubmitSummary) -> None:
        """Flush and check every send: a prompt counts as accepted only once the broker has it."""
        if not pending:
            return
        self.producer.flush()
        for future, prompt_id in pending:
            future.get(timeout=0)  # raises KafkaError: the caller sees the failure, nothing is hidden
            summary.accepted += 1
            summary.accepted_ids.append(prompt_id)
        metrics.RECORDS_OUT.labels(SERVICE, self.topic).inc(len(pending))
        pending.clear()


def _id_of(item) -> str:
    if isinstance(item, prompt_pb2.Prompt):
        return item.id
    if isinstance(item, dict) and isinstance(item.get("id"), str):
        return item["id"]
    return ""


def read_jsonl(lines: Iterable[str]) -> Iterable[prompt_pb2.Prompt | InvalidPrompt]:
    """Parse JSONL lines lazily, skipping blank lines; a bad line becomes an InvalidPrompt item so
    it is reported at its position and the rest still go."""
    for line in lines:
        if not line.strip():
            continue
        try:
            yield parse_line(line)
        except InvalidPrompt as exc:
            yield exc
