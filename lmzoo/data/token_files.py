"""Token files: a corpus's text routed to its splits, encoded in jobs and appended to one flat file of
ids per split (<split>.bin), with a separator between documents; the held-out splits' text is hashed on
the way. A thread of its own writes the files while the next job is encoded.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lmzoo.data.corpus import SPLITS, CorpusPlan, check_counts, split_counts
from lmzoo.data.scan import Scanned, progress_bar
from lmzoo.data.sources import Piece
from lmzoo.data.tokenizer import EOS, Tokenizer

BATCH_CHARS = 1 << 22  # characters of text per encoding job
WRITES_AHEAD = 2  # writes the encoding may be ahead of the disk

Tag = tuple[str, bool, int]  # a piece's split, whether it ends a document, its characters
Jobs = Iterator[tuple[list[Tag], list[str]]]
Encoded = Iterator[tuple[list[Tag], list[np.ndarray]]]


@dataclass
class SplitStats:
    tokens: int = 0
    documents: int = 0
    characters: int | None = 0
    text_sha256: str | None = None  # held-out splits: sha256 of their text
    started: bool = False  # the current document has written tokens
    separate: bool = False  # a document ended: the next tokens start with the separator


def separator_ids(tokenizer: Tokenizer, document_end: str) -> list[int]:
    """The ids between two documents: <eos>, nothing (""), or the encoded text."""
    if document_end == EOS:
        return [tokenizer.eos_id]
    return tokenizer.encode(document_end) if document_end else []


def piece_jobs(pieces: Iterator[tuple[str, Piece]], stop: Callable[[], bool] | None = None) -> Jobs:
    """Consecutive pieces grouped into jobs of about BATCH_CHARS characters: (tags, texts); with `stop`,
    no job starts once it is true."""
    tags: list[Tag] = []
    texts: list[str] = []
    size = 0
    for split, piece in pieces:
        if not texts and stop is not None and stop():
            return
        tags.append((split, piece.ends_document, len(piece.text)))
        texts.append(piece.text)
        size += len(piece.text)
        if size >= BATCH_CHARS:
            yield tags, texts
            tags, texts, size = [], [], 0
    if texts:
        yield tags, texts


def write_splits(
    corpus: Scanned,
    directory: Path,
    encode: Callable[[Jobs], Encoded],
    separator: np.ndarray,
    *,
    progress: bool,
    suffix: str = ".bin",
) -> dict[str, SplitStats]:
    """Route the corpus's text to its splits in jobs, encode them with `encode` (ids of separator's dtype)
    and append them to <split><suffix> in `directory`, `separator` between documents; return what each
    split holds."""
    stats = {name: SplitStats() for name in SPLITS}
    hashes = {name: hashlib.sha256() for name in ("val", "test")}
    outputs = {name: open(directory / f"{name}{suffix}", "wb") for name in SPLITS}  # noqa: SIM115
    between = separator.tobytes()
    writer = BackgroundWriter()
    try:
        with progress_bar(corpus.size, "tokenizing", progress) as bar:
            for tags, arrays in encode(piece_jobs(_hashed(corpus.route(), hashes))):
                for (split, ends, chars), ids in zip(tags, arrays, strict=True):
                    _write(writer, outputs[split], stats[split], ids, between, len(separator))
                    stats[split].characters = (stats[split].characters or 0) + chars
                    if ends:
                        stats[split].separate = stats[split].separate or stats[split].started
                        stats[split].started = False
                    bar.update(chars)
        writer.finish()
    finally:
        writer.stop()
        for handle in outputs.values():
            handle.close()
    for name, hasher in hashes.items():
        stats[name].text_sha256 = hasher.hexdigest()
    return stats


def _hashed(pieces: Iterator[tuple[str, Piece]], hashes: dict[str, Any]) -> Iterator[tuple[str, Piece]]:
    """The pieces, hashing the text of the held-out splits on the way (what `lmzoo compare` checks)."""
    for split, piece in pieces:
        if split in hashes:
            hashes[split].update(piece.text.encode("utf-8"))
        yield split, piece


class BackgroundWriter:
    """Writes to files in a thread of its own, in order, at most WRITES_AHEAD writes behind: writing
    releases the GIL, so the kernel's copying overlaps with the encoding."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(1)
        self.pending: deque[Future[int]] = deque()

    def write(self, handle: BinaryIO, data: bytes | memoryview) -> None:
        self.pending.append(self.pool.submit(handle.write, data))
        while len(self.pending) > WRITES_AHEAD:
            self.pending.popleft().result()  # a failed write (a full disk) is raised here

    def finish(self) -> None:
        """Wait for every write; raise the first that failed."""
        while self.pending:
            self.pending.popleft().result()

    def stop(self) -> None:
        """Drop what is not written yet (after a failure) and end the thread."""
        self.pool.shutdown(wait=True, cancel_futures=True)


def _write(
    writer: BackgroundWriter,
    handle: BinaryIO,
    stats: SplitStats,
    ids: np.ndarray,
    separator: bytes,
    separator_tokens: int,
) -> None:
    if not len(ids):
        return
    if stats.separate:
        writer.write(handle, separator)
        stats.tokens += separator_tokens
        stats.separate = False
    writer.write(handle, ids.data.cast("B"))  # no copy: the array is kept until written
    stats.tokens += len(ids)
    stats.documents += not stats.started  # documents with text in this split (one may span two splits)
    stats.started = True


def carve_token_tail(plan: CorpusPlan, directory: Path, stats: dict[str, SplitStats], itemsize: int) -> None:
    """Move the validation/test tail of train.bin into their files (the token-tail split rule)."""
    total = stats["train"].tokens
    counts = split_counts(total, plan.data.split, plan.given)
    check_counts(counts, "tokens", total, plan.given)
    start = counts["train"]
    with open(directory / "train.bin", "r+b") as train:
        for name in ("val", "test"):
            if name not in counts:
                continue
            train.seek(start * itemsize)
            with open(directory / f"{name}.bin", "wb") as out:
                remaining = counts[name] * itemsize
                while remaining:
                    block = train.read(min(remaining, 1 << 24))
                    out.write(block)
                    remaining -= len(block)
            stats[name] = SplitStats(tokens=counts[name], documents=0, characters=None)
            start += counts[name]
        train.truncate(counts["train"] * itemsize)
    stats["train"].tokens, stats["train"].characters = counts["train"], None
