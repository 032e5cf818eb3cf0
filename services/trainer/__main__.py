"""`distill run trainer`: the student trainer, distill.shards -> KD training -> distill.checkpoints."""

from __future__ import annotations

from distillery.v1 import services_pb2_grpc
from services.common.config import load
from services.common.loop import StopFlag
from services.common.service import run_consumer_service
from services.trainer.config import TrainerSettings
from services.trainer.server import TrainerService
from services.trainer.stage import SERVICE, CheckpointBoard, make_stage


def main(settings: TrainerSettings | None = None, stop: StopFlag | None = None) -> None:
    settings = settings or load(TrainerSettings)
    board = CheckpointBoard()
    run_consumer_service(
        SERVICE,
        settings,
        lambda stack: make_stage(settings, board, stack),
        grpc_servicers=lambda server: server.add(
            services_pb2_grpc.add_TrainerServiceServicer_to_server, TrainerService(board, settings.run_id)
        ),
        # one shard per poll: a training step never sits between a poll and a long backlog
        max_records=1,
        stop=stop,
    )


if __name__ == "__main__":
    main()
