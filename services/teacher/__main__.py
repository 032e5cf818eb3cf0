"""`distill run teacher`: teacher-inference, distill.prompts -> Triton -> distill.teacher-outputs."""

from __future__ import annotations

from services.common.config import load
from services.common.loop import StopFlag
from services.common.service import run_consumer_service
from services.teacher.config import TeacherSettings
from services.teacher.stage import SERVICE, make_stage


def main(settings: TeacherSettings | None = None, stop: StopFlag | None = None) -> None:
    settings = settings or load(TeacherSettings)
    run_consumer_service(
        SERVICE,
        settings,
        lambda stack: make_stage(settings, stack),
        # one poll = several waves of Triton requests: the pool keeps `in_flight` busy throughout
        max_records=4 * settings.in_flight,
        stop=stop,
    )


if __name__ == "__main__":
    main()
