"""Files that are never half-written: atomic writes (temp file, fsync, rename) and directory fsync.

Checkpoints, tokenizers, configs, metrics and indexes all write through here, so a crash at any
moment leaves either the old or the new file under its final name.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmzoo.errors import CheckpointError


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op on Windows, where directories cannot be fsynced)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, then rename over it: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write {path}: {err.strerror or err}") from None
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_tree(path: Path) -> None:
    """fsync every file directly inside `path`, then `path` itself (before it is renamed into place)."""
    for child in path.iterdir():
        if child.is_file():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(path)
