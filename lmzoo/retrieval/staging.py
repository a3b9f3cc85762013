"""Directories that appear whole or not at all: written into a hidden temp sibling, fsynced, renamed.

Datastores and passage indexes are several files; a crash or an error while writing leaves no
half-written directory under the final name (the temp one is removed on any error).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from lmzoo.errors import CheckpointError
from lmzoo.io import fsync_tree


@contextlib.contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """Yield a temp directory beside `out`; on success it becomes `out` (refused if `out` exists)."""
    if out.exists():
        raise CheckpointError(f"{out} already exists; choose another out= or remove it first", param="out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
