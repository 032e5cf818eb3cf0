"""gRPC PromptService: client-streaming Submit over the same PromptSubmitter as `distill submit`."""

from __future__ import annotations

import threading

from distillery.v1 import services_pb2_grpc
from services.producer.submit import PromptSubmitter


class PromptService(services_pb2_grpc.PromptServiceServicer):
    def __init__(self, submitter: PromptSubmitter):
        self.submitter = submitter
        # one KafkaProducer is thread-safe, but summaries must not interleave their flush checks
        self._lock = threading.Lock()

    def Submit(self, request_iterator, context):
        with self._lock:
            return self.submitter.submit(request_iterator)
