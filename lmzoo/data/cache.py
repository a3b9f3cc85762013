"""Where prepared corpora live: cache keys, the lock, manifests, and directories written all at once.

    <cache dir>/<corpus key>/            one corpus: its files, data options and split rule
        .lock                            held while the corpus is checked or prepared
        scan.json                        its sources (path, size, mtime, sha256) and line/document counts
        fit-<key>/tokenizer.json         a tokenizer fitted on it from a `tokenizer:` section
        tok-<tokenizer sha256>/          its tokens under one tokenizer:
            manifest.json                sources, tokenizer hash, dtype, counts, split boundaries
            train.bin val.bin test.bin   flat uint16 (vocabularies up to 65,536) or uint32 token ids

The cache directory is `data.cache_dir`, else $LMZOO_CACHE_DIR, else lmzoo/prepared under the user's
cache directory ($XDG_CACHE_HOME or ~/.cache). Every entry is written into a temporary directory and
renamed into place, and the manifest is written last: a prepare that is killed or fails leaves
nothing a later run trusts, and the next prepare removes its leftovers.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmzoo.errors import DataError
from lmzoo.io import atomic_write_text, fsync_dir, fsync_tree

FORMAT = "lmzoo.prepared"
VERSION = 1  # of the prepared layout and manifest; entries of another version are prepared again
CACHE_ENV = "LMZOO_CACHE_DIR"
MANIFEST = "manifest.json"
SCAN = "scan.json"
TMP = ".tmp-"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def default_cache_dir() -> Path:
    """$LMZOO_CACHE_DIR, else lmzoo/prepared in the user's cache directory."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    elif os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lmzoo" / "prepared"


def cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def digest(value: Any) -> str:
    """sha256 of a JSON value in canonical form (sorted keys)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when it is missing or unreadable (a cache entry to redo)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_json(path: Path, value: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(value, indent=1, ensure_ascii=False))


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold `directory`/.lock exclusively: one process prepares a corpus, the others wait, then reuse it.

    The lock is the operating system's (flock): it ends with the process, however the process ends.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / ".lock", "a+b")  # noqa: SIM115 (closed below)
    except OSError as err:
        raise DataError(f"cannot use the corpus cache {directory}: {err.strerror or err}") from None
    try:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; concurrent prepares of one corpus are not guarded
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def remove_leftovers(directory: Path) -> None:
    """Delete temporary directories of prepares that died (call with the lock held: no prepare is live)."""
    for child in directory.glob(f"*{TMP}*") if directory.is_dir() else []:
        shutil.rmtree(child, ignore_errors=True)


@contextlib.contextmanager
def staged(final: Path) -> Iterator[Path]:
    """A temporary directory beside `final`, renamed to `final` (replacing it) when the block succeeds and
    removed when it fails. A full disk ends in a one-line DataError."""
    tmp = final.with_name(f"{final.name}{TMP}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            old = final.with_name(f"{final.name}{TMP}old-{os.getpid()}")
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(err, final.parent) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def scratch(root: Path) -> Iterator[Path]:
    """A temporary directory in `root` for files a prepare needs on the way, removed after the block
    (and by `remove_leftovers` after a prepare that died). A full disk ends in a one-line DataError."""
    path = root / f"scratch{TMP}{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    try:
        path.mkdir(parents=True)
        yield path
    except OSError as err:
        raise _write_error(err, root) from None
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _write_error(err: OSError, where: Path) -> DataError:
    if err.errno in DISK_FULL:
        return DataError(
            f"no space left for the prepared corpus in {where} ({err.strerror}); free some space "
            "or point data.cache_dir at a disk with room. Nothing half-written was kept"
        )
    return DataError(f"cannot write the prepared corpus in {where}: {err.strerror or err}")


def check_room(directory: Path, needed: int) -> None:
    """Refuse early when the disk holding `directory` has less than `needed` bytes free."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    if free < needed:
        raise DataError(
            f"no space left for the prepared corpus in {directory}: it needs about {needed / 1e6:,.0f} MB, "
            f"{free / 1e6:,.0f} MB are free; free some space or point data.cache_dir at a disk with room"
        )
