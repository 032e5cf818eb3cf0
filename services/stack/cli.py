"""`distill`: the one command line of Distillery.

    distill up       the whole system in the foreground (Kafka, Triton + teacher, every service)
    distill demo     the main job: make models, start the stack, submit prompts, watch the student learn
    distill submit   push prompts (JSONL file or -) onto distill.prompts
    distill watch    print trained-checkpoint events as JSON lines
    distill status   lag per stage, latest checkpoint
    distill run      one service alone (what containers run): producer | teacher | sink | trainer
    distill models   make the small teacher and student used by the demo and the tests
    distill report   training-data summary of a checkpoint or the whole data dir
    distill dlq      list (and re-submit) dead letters

Settings come from DISTILL_ variables; flags override them. Without DISTILL_KAFKA_BOOTSTRAP, client
commands use the endpoints of a running `distill up` in the same --data-dir.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from google.protobuf import json_format

from services.common.config import CommonSettings

SERVICE_MODULES = {"producer": "services.producer", "teacher": "services.teacher", "sink": "services.sink",
                   "trainer": "services.trainer"}


def client_settings(args) -> CommonSettings:
    """Settings for a client command: flags, then DISTILL_ env, then the running local stack."""
    overrides = {}
    data_dir = Path(args.data_dir) if args.data_dir else None
    if data_dir:
        overrides["data_dir"] = data_dir
    if getattr(args, "bootstrap", None):
        overrides["kafka_bootstrap"] = args.bootstrap
    elif "DISTILL_KAFKA_BOOTSTRAP" not in os.environ:
        from services.stack.local import read_endpoints

        endpoints = read_endpoints(data_dir or CommonSettings().data_dir)
        if endpoints.get("kafka"):
            overrides["kafka_bootstrap"] = endpoints["kafka"]
            if "DISTILL_TOPIC_PREFIX" not in os.environ and endpoints.get("topic_prefix"):
                overrides["topic_prefix"] = endpoints["topic_prefix"]
    return CommonSettings(**overrides)


def _out(message) -> None:
    sys.stdout.write(json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True)) + "\n")
    sys.stdout.flush()


def cmd_submit(args) -> int:
    from services.producer.submit import read_jsonl
    from services.sdk import Client

    stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
    with stream, Client(settings=client_settings(args)) as client:
        summary = client.submit(read_jsonl(stream))
    body = json_format.MessageToDict(summary, preserving_proto_field_name=True)
    body.pop("accepted_ids", None)
    body.setdefault("accepted", 0)
    body.setdefault("rejected", 0)
    sys.stdout.write(json.dumps(body) + "\n")
    return 0 if summary.rejected == 0 else 3


def cmd_watch(args) -> int:
    from services.sdk import Client

    client = Client(settings=client_settings(args))
    seen = 0
    for checkpoint in client.checkpoints(from_beginning=not args.latest, timeout=args.timeout):
        _out(checkpoint)
        seen += 1
        if args.count and seen >= args.count:
            break
    return 0


def cmd_status(args) -> int:
    from services.stack.status import stack_status

    body = stack_status(client_settings(args))
    sys.stdout.write(json.dumps(body, indent=2, default=str) + "\n")
    return 0


def cmd_run(args) -> int:
    if args.data_dir:
        os.environ["DISTILL_DATA_DIR"] = args.data_dir
    module = importlib.import_module(SERVICE_MODULES[args.service] + ".__main__")
    module.main()
    return 0


def cmd_models(args) -> int:
    from services.stack.models import ensure_models

    teacher, student = ensure_models(Path(args.out), train_seconds=args.train_seconds)
    sys.stdout.write(json.dumps({"teacher": str(teacher), "student": str(student)}) + "\n")
    return 0


def _stack_config(args, **extra):
    from services.stack.local import StackConfig

    return StackConfig(data_dir=Path(args.data_dir or ".distill"), teacher_replicas=args.teacher_replicas,
                       partitions=args.partitions, **extra)


def cmd_up(args) -> int:
    from services.common.loop import StopFlag
    from services.stack.local import LocalStack

    import time

    stop = StopFlag().install()
    restarts: dict[str, tuple[int, float]] = {}  # name -> (restarts so far, not before)
    with LocalStack(_stack_config(args)) as stack:
        sys.stderr.write("distill up: " + json.dumps(stack.endpoints) + "\n  Ctrl-C stops everything.\n")
        while not stop.wait(1.0):
            for process in stack.dead_processes():
                count, not_before = restarts.get(process.name, (0, 0.0))
                if time.monotonic() < not_before:
                    continue
                delay = min(2.0 ** count, 60.0)  # like a restart policy: back off, never give up
                sys.stderr.write(f"{process.name} exited ({process.proc.returncode}); restarting "
                                 f"(next back-off {delay:.0f}s). Log: {process.log_path}\n")
                name, index = process.name.rsplit("-", 1)
                stack.start_service(name, int(index))
                restarts[process.name] = (count + 1, time.monotonic() + delay)
    return 0


def cmd_demo(args) -> int:
    import signal

    from services.stack.demo import run_demo

    # SIGTERM unwinds like Ctrl-C, so the stack's context manager stops every child process
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return run_demo(_stack_config(args), prompts=args.prompts, timeout=args.timeout)


def cmd_report(args) -> int:
    from services.stack.report import main as report_main

    # dead letters come from the broker when one is configured (env) or running (distill up)
    reachable = getattr(args, "bootstrap", None) or "DISTILL_KAFKA_BOOTSTRAP" in os.environ or \
        (Path(args.data_dir or ".distill") / "stack.json").exists()
    return report_main(args, client_settings(args) if reachable else None)


def cmd_dlq(args) -> int:
    from services.stack.dlq import main as dlq_main

    return dlq_main(args, client_settings(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("DISTILL_DATA_DIR"),
                        help="state directory (default ./.distill, env DISTILL_DATA_DIR)")
    sub = parser.add_subparsers(dest="command", required=True)

    def stack_flags(p):
        p.add_argument("--teacher-replicas", type=int, default=1)
        p.add_argument("--partitions", type=int, default=4, help="partitions of prompts and teacher-outputs")

    p = sub.add_parser("up", help="run the whole system in the foreground")
    stack_flags(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("demo", help="prompts in, checkpoints out, on the bundled small models")
    stack_flags(p)
    p.add_argument("--prompts", type=int, default=400)
    p.add_argument("--timeout", type=float, default=900)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("submit", help="push prompts from a JSONL file (or - for stdin)")
    p.add_argument("file")
    p.add_argument("--bootstrap")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("watch", help="print checkpoint events as JSON lines")
    p.add_argument("--bootstrap")
    p.add_argument("--latest", action="store_true", help="only new events, not those already on the topic")
    p.add_argument("--count", type=int, default=0, help="stop after this many events")
    p.add_argument("--timeout", type=float, default=None, help="stop after this many idle seconds")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("status", help="lag and rates per stage, latest checkpoint")
    p.add_argument("--bootstrap")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("run", help="run one service (what containers run)")
    p.add_argument("service", choices=sorted(SERVICE_MODULES))
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("models", help="make the small teacher and student models")
    p.add_argument("--out", default=".distill/models")
    p.add_argument("--train-seconds", type=float, default=60.0)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("report", help="training-data summary (Markdown + JSON) from recorded lineage")
    p.add_argument("checkpoint", nargs="?", help="a checkpoint folder; default: the whole data dir")
    p.add_argument("--out", help="folder for report.md and report.json (default: beside the checkpoint)")
    p.add_argument("--verify", action="store_true", help="recompute shard sha256 and fail on any mismatch")
    p.add_argument("--bootstrap", help="broker to count dead letters from (default: DISTILL_ env or distill up)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("dlq", help="list dead letters; --resubmit sends them back to their source topic")
    p.add_argument("--bootstrap")
    p.add_argument("--reason", help="only dead letters with this reason")
    p.add_argument("--resubmit", action="store_true")
    p.add_argument("--limit", type=int, default=1000)
    p.set_defaults(func=cmd_dlq)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from services.common.logging import configure_logging

    if args.command not in ("run",):
        configure_logging(f"cli-{args.command}", os.environ.get("DISTILL_LOG_LEVEL", "WARNING"))
        # a consumer that subscribes before its topic's metadata arrives warns once; not news here
        logging.getLogger("kafka.coordinator.assignors").setLevel(logging.ERROR)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
