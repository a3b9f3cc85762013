"""A corpus and its splits: which sources play which role, how the training sources are cut into train,
validation and test, and the routing of their text, piece by piece, to those splits.

The training sources (`data.train`) are carved in order by `data.split` fractions, counted in one of:

* lines (plain text files named one by one: what lmzoo always did, the default for them),
* documents (folders, globs, JSONL, parquet: each file or record is a document),
* tokens (the token tail: the last fractions of the encoded stream, as nanoGPT holds out its last 10%).

A split with a file of its own (`data.val`, `data.test`) takes all of that file, and the fractions are
shared among the splits that are carved. Small example files (sentence pairs, records) are read
whole with `read_text_file`.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lmzoo.config.schema import DataConfig, resolve_data_path
from lmzoo.data.cache import VERSION, cache_root, digest
from lmzoo.data.sources import Found, Piece, Source, find_sources, is_pattern, read_pieces
from lmzoo.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
UNIT_NAMES = {"lines": "lines", "documents": "documents", "tokens": "tokens"}


def read_text_file(path: str | Path) -> str:
    """Read a UTF-8 file whole; missing, undecodable or blank files raise a one-line DataError."""
    resolved = resolve_data_path(str(path))
    try:
        raw = resolved.read_bytes()
    except FileNotFoundError:
        raise DataError(f"corpus file not found: {resolved}") from None
    except IsADirectoryError:
        raise DataError(f"corpus path is a directory, not a file: {resolved}") from None
    except OSError as err:
        raise DataError(f"cannot read corpus file {resolved}: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{resolved}: not UTF-8 text (byte {err.start}, line {line}: {err.reason})") from None
    if not text.strip():
        raise DataError(f"{resolved}: the file is {'empty' if not text else 'only whitespace'}")
    return text.replace("\r\n", "\n")


def split_counts(total: int, fractions: tuple[float, float, float], given: dict[str, bool]) -> dict[str, int]:
    """How many of `total` items each carved split gets, in order train/val/test, skipping the `given` ones.

    The fractions are shared among the carved splits, so with a separate validation file and split
    (0.9, 0.05, 0.05), training keeps 95%. Rounding leftovers go to the last carved split.
    """
    carved = {n: f for n, f in zip(SPLITS, fractions, strict=True) if not given.get(n)}
    share = sum(carved.values())
    counts: dict[str, int] = {}
    used = 0
    for index, (name, fraction) in enumerate(carved.items()):
        if index == len(carved) - 1:
            counts[name] = total - used
            break
        count = min(total - used, round(total * fraction / share))
        if name == "train":
            count = max(1, count) if total else 0
        counts[name] = count
        used += count
    return counts


def carve_splits(
    items: list, fractions: tuple[float, float, float], given: dict[str, bool]
) -> dict[str, list]:
    """Split `items` in order into train/val/test by `fractions` (see `split_counts`)."""
    parts, start = {}, 0
    for name, count in split_counts(len(items), fractions, given).items():
        parts[name] = items[start : start + count]
        start += count
    return parts


def check_counts(counts: dict[str, int], unit: str, total: int, given: dict[str, bool]) -> None:
    """One-line errors for an empty training or validation split."""
    if not counts.get("train"):
        raise DataError("the training split is empty: lower data.split's validation/test fractions")
    if not given.get("val") and not counts.get("val"):
        hint = " or set data.split_by: tokens" if unit == "documents" else ""
        raise DataError(
            f"the validation split is empty ({total} {unit} in all): give data.val a file "
            f"or raise the validation fraction in data.split{hint}"
        )


@dataclass
class CorpusPlan:
    """A corpus as `prepare` sees it: its sources by role, how the training sources are carved, and the
    directory of the cache it is prepared in (named by a key over what defines its text)."""

    data: DataConfig
    roles: dict[str, Found]  # "train", and "val" / "test" when they have files of their own
    unit: str  # lines | documents | tokens
    key: str
    root: Path

    @property
    def given(self) -> dict[str, bool]:
        return {"val": "val" in self.roles, "test": "test" in self.roles}

    def describe(self) -> str:
        entries = self.data.train_files
        sources = [s for found in self.roles.values() for s in found.sources]
        size = sum(s.size for s in sources)
        name = entries[0] if len(entries) == 1 else f"{len(entries)} entries"
        files = f"{len(sources):,} files, " if len(sources) > 1 else ""
        return f"{name} ({files}{size / 1e6:,.1f} MB)"


def _entry_identity(entry: str) -> str:
    if is_pattern(entry) and not entry.startswith("lmzoo:"):
        return os.path.abspath(os.path.expanduser(entry))
    return str(resolve_data_path(entry).resolve())


def plan_corpus(data: DataConfig) -> CorpusPlan:
    """Find the corpus's sources and decide how it is carved; ConfigError for a split rule it cannot use."""
    roles = {"train": find_sources(data.train_files, "data.train")}
    for role in ("val", "test"):
        entry = getattr(data, role)
        if entry:
            roles[role] = find_sources(entry, f"data.{role}")
    train = roles["train"].sources
    plain = all(s.kind == "text" for s in train)
    unit = data.split_by
    if unit == "auto":
        unit = "lines" if plain and all(s.explicit for s in train) else "documents"
    if unit == "lines" and not plain:
        raise ConfigError(
            "data.split_by: lines needs plain text files; JSONL, parquet and datasets are split by "
            "documents or tokens"
        )
    spec = {
        "version": VERSION,
        "entries": {role: [_entry_identity(e) for e in _entries(data, role)] for role in roles},
        "text_field": data.text_field,
        "document_end": data.document_end,
        "split": list(data.split),
        "unit": unit,
    }
    key = digest(spec)[:20]
    return CorpusPlan(data, roles, unit, key, cache_root(data.cache_dir) / key)


def _entries(data: DataConfig, role: str) -> list[str]:
    value = data.train_files if role == "train" else getattr(data, role)
    return [value] if isinstance(value, str) else list(value)


# ---- routing text to splits ------------------------------------------------------------------------


def route(
    plan: CorpusPlan, sources: dict[str, list[Source]], counts: dict[str, int]
) -> Iterator[tuple[str, Piece]]:
    """(split, piece) for the text of every source: the training sources carved by `counts` (units per
    carved split; lines or documents), the others whole into their own split."""
    for role, found in sources.items():
        pieces = (p for s in found for p in read_pieces(s, plan.data.text_field))
        if role != "train":
            yield from ((role, p) for p in pieces)
        elif plan.unit == "tokens":
            yield from (("train", p) for p in pieces)
        elif plan.unit == "lines":
            yield from _by_lines(pieces, list(counts.items()))
        else:
            yield from _by_documents(pieces, list(counts.items()))


def _by_documents(pieces: Iterable[Piece], quotas: list[tuple[str, int]]) -> Iterator[tuple[str, Piece]]:
    pending = deque(quotas)
    name, left = pending.popleft()
    for piece in pieces:
        while left == 0 and pending:
            name, left = pending.popleft()
        yield name, piece
        if piece.ends_document:
            left -= 1


def _by_lines(pieces: Iterable[Piece], quotas: list[tuple[str, int]]) -> Iterator[tuple[str, Piece]]:
    pending = deque(quotas)
    name, left = pending.popleft()
    for piece in pieces:
        text = piece.text
        while text:
            while left == 0 and pending:
                name, left = pending.popleft()
            lines = text.count("\n")
            if lines < left or (left == 0 and not pending):
                yield name, Piece(text, piece.ends_document)
                left = max(0, left - lines)
                break
            cut = _after_line(text, left)
            rest = text[cut:]
            yield name, Piece(text[:cut], piece.ends_document and not rest)
            text, left = rest, 0


def _after_line(text: str, count: int) -> int:
    """The position right after the `count`-th "\\n" of `text` (split by C code, not a Python loop)."""
    if count == 0:
        return 0
    parts = text.split("\n", count)
    assert len(parts) == count + 1, "the text has fewer line ends than asked for"
    return len(text) - len(parts[-1])
