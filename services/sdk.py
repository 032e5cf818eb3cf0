"""The Python SDK: submit prompts and follow trained-checkpoint events.

    from services.sdk import Client
    client = Client(bootstrap="127.0.0.1:9092")
    summary = client.submit([{"prompt": "reverse: a b c"}, {"messages": [{"role": "user", "content": "hi"}]}])
    for checkpoint in client.checkpoints(timeout=600):
        print(checkpoint.step, checkpoint.uri, checkpoint.metrics.token_agreement)

It wraps the same code as `distill submit` / `distill watch` and the producer service.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator

from distillery.v1 import checkpoint_pb2, prompt_pb2, services_pb2
from services.common import codec
from services.common.config import CHECKPOINTS, CommonSettings
from services.common.kafka import make_consumer, make_producer
from services.producer.submit import PromptSubmitter


class Client:
    def __init__(self, bootstrap: str | None = None, settings: CommonSettings | None = None, **overrides):
        if settings is None:
            if bootstrap:
                overrides["kafka_bootstrap"] = bootstrap
            settings = CommonSettings(**overrides)
        self.settings = settings
        self._producer = None

    def submit(self, prompts: Iterable[prompt_pb2.Prompt | dict | str]) -> services_pb2.SubmitSummary:
        """Validate and send prompts (Prompt messages, JSON-shaped dicts or JSONL lines); returns
        accepted/rejected counts, the reasons, and the ids of accepted prompts."""
        if self._producer is None:
            self._producer = make_producer(self.settings, f"distill-sdk-{uuid.uuid4().hex[:8]}")
        return PromptSubmitter(self.settings, self._producer).submit(prompts)

    def checkpoints(
        self,
        from_beginning: bool = True,
        timeout: float | None = None,
        group_id: str | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> Iterator[checkpoint_pb2.CheckpointReady]:
        """CheckpointReady events as they arrive. From the beginning of the topic by default;
        ends after `timeout` seconds without a new event (None: never), or when `stop()` is true
        (checked twice a second)."""
        consumer = make_consumer(
            self.settings,
            group_id or f"distill-watch-{uuid.uuid4().hex[:8]}",
            f"distill-sdk-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest" if from_beginning else "latest",
            enable_auto_commit=False,
        )
        consumer.subscribe([self.settings.topic(CHECKPOINTS)])
        last = time.monotonic()
        try:
            while (timeout is None or time.monotonic() - last < timeout) and not (stop and stop()):
                for records in consumer.poll(timeout_ms=500).values():
                    for record in records:
                        last = time.monotonic()
                        yield codec.decode(record.value, record.headers, checkpoint_pb2.CheckpointReady)
        finally:
            consumer.close()

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()
            self._producer = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
