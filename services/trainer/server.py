"""gRPC TrainerService: list and watch checkpoints, report the trainer's status."""

from __future__ import annotations

from distillery.v1 import services_pb2, services_pb2_grpc
from services.trainer.stage import CheckpointBoard


class TrainerService(services_pb2_grpc.TrainerServiceServicer):
    def __init__(self, board: CheckpointBoard, run_id: str):
        self.board = board
        self.run_id = run_id

    def ListCheckpoints(self, request, context):
        events = [e for e in self.board.events if not request.run_id or e.run_id == request.run_id]
        return services_pb2.ListCheckpointsResponse(checkpoints=events)

    def WatchCheckpoints(self, request, context):
        sent = 0 if request.include_existing else len(self.board.events)
        while context.is_active():
            for event in self.board.wait_after(sent, timeout=1.0):
                sent += 1
                if not request.run_id or event.run_id == request.run_id:
                    yield event

    def GetStatus(self, request, context):
        latest = self.board.events[-1] if self.board.events else None
        status = services_pb2.TrainerStatus(run_id=self.run_id, state=self.board.state)
        if latest is not None:
            status.latest.CopyFrom(latest)
            status.step = latest.step
            status.samples = latest.samples
            status.shards_trained = len(latest.shards)
        return status
