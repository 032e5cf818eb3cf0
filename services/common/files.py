"""Durable files: content hashes, fsync, write-to-temporary-then-rename. Shards, manifests,
checkpoints and markers are all written this way, so a crash leaves the old file or the new one,
never half of one."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def same_digest(a: str, b: str) -> bool:
    """Two sha256 hex digests are the same, whether or not either carries the "sha256:" prefix."""
    return a.removeprefix("sha256:") == b.removeprefix("sha256:")


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` fills a temporary file beside `path`; it is fsynced and renamed over `path`."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
