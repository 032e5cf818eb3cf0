"""Regenerate the checked-in Python code from protos/distillery/v1/*.proto.

Usage: python protos/generate.py [--check]
With --check, generate into a temporary folder and exit 1 if the checked-in code differs.
"""

from __future__ import annotations

import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent
PACKAGE = ROOT / "distillery" / "v1"


def generate(out: Path) -> list[Path]:
    sources = sorted(PACKAGE.glob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(s.relative_to(ROOT)) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out / "distillery" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    check = "--check" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        stale = []
        for path in generated:
            target = PACKAGE / path.name
            if check:
                if not target.exists() or not filecmp.cmp(path, target, shallow=False):
                    stale.append(path.name)
            else:
                shutil.copyfile(path, target)
        if check:
            existing = {p.name for p in PACKAGE.glob("*_pb2*.py*")}
            stale += sorted(existing - {p.name for p in generated})
            if stale:
                print("stale generated code: " + ", ".join(stale) + " (run: make protos)")
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
