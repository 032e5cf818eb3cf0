"""`distill run sink`: the dataset sink, distill.teacher-outputs -> Parquet shards -> distill.shards."""

from __future__ import annotations

from services.common.config import load
from services.common.loop import StopFlag
from services.common.service import run_consumer_service
from services.sink.config import SinkSettings
from services.sink.stage import SERVICE, make_stage


def main(settings: SinkSettings | None = None, stop: StopFlag | None = None) -> None:
    settings = settings or load(SinkSettings)
    run_consumer_service(SERVICE, settings, lambda stack: make_stage(settings, stack), max_records=500, stop=stop)


if __name__ == "__main__":
    main()
