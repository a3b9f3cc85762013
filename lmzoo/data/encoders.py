"""Encoding large texts fast, to exactly the ids `Tokenizer.encode` gives the same text.

* char: vectorised lookups (a byte translation table for ASCII text, a table of the 65,536 UTF-16 code
  units for text within the Basic Multilingual Plane, a code-point table otherwise);
* BPE: text pre-tokenized in Python (lmzoo.data.pretokens) with a cache of encoded pre-tokens; in worker
  processes, one per core;
* word (and any other registered tokenizer): `Tokenizer.encode` in worker processes, one per core.

Texts are cut into pieces only where every tokenizer encodes the pieces as it encodes the whole
(`safe_pieces`), so the ids of a corpus do not depend on how it was read in chunks.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import BrokenExecutor, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from lmzoo.data.pretokens import pretokens
from lmzoo.data.tokenizer import BpeTokenizer, CharTokenizer, Tokenizer, tokenizer_from_dict
from lmzoo.errors import DataError

T = TypeVar("T")
A = TypeVar("A")
R = TypeVar("R")
ASCII_RUN = 80  # text the pre-tokenizing cannot place is cut into pieces of about this many characters
KNOWN_PIECES = 1 << 21  # distinct pre-tokens a BPE encoder remembers
SEARCH = 64  # cut candidates tried before giving up on a region
PARALLEL_BYTES = 16 << 20  # smaller corpora are encoded in this process: starting workers costs more


def _solid(char: str) -> bool:
    return not char.isspace()


def safe_cut(text: str, start: int, target: int) -> int | None:
    """A position near `target` (after `start`) where `text` may be cut: right after a "\\n" or right before
    a " ", with no whitespace on either side. Any tokenizer gives text[:p] + text[p:] the ids of text."""
    end = len(text)
    for char, after in (("\n", 1), (" ", 0)):
        for direction in (-1, 1):
            position, tries = target, 0
            while tries < SEARCH:
                tries += 1
                found = (
                    text.rfind(char, start + 1, position)
                    if direction < 0
                    else text.find(char, position, end - 1)
                )
                if found <= start:
                    break
                if _solid(text[found - 1]) and found + 1 < end and _solid(text[found + 1]):
                    return found + after
                position = found if direction < 0 else found + 1
    return None


def safe_pieces(text: str, size: int) -> list[str]:
    """`text` cut at safe places into pieces of about `size` characters (longer where it has none)."""
    pieces, start = [], 0
    while len(text) - start > 2 * size:
        cut = safe_cut(text, start, start + size)
        if cut is None:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def id_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """uint16 when every id fits, else uint32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


class CharEncoder:
    """CharTokenizer.encode as table lookups."""

    def __init__(self, tokenizer: CharTokenizer, dtype: type[np.unsignedinteger]) -> None:
        self.dtype, unk = dtype, tokenizer.unk_id
        codes = {ord(ch): i for ch, i in tokenizer.stoi.items() if len(ch) == 1}
        size = max(codes, default=0) + 2  # the last entry: every code point beyond the vocabulary
        self.table = np.full(size, unk, dtype=dtype)
        for code, index in codes.items():
            self.table[code] = index
        ascii_ids = [codes.get(c, unk) for c in range(128)]
        self.ascii = bytes(ascii_ids) + bytes(128) if max(ascii_ids) < 256 else None
        self.bmp = np.full(1 << 16, unk, dtype=dtype)  # indexed by UTF-16 code units: no clipping needed
        within = min(len(self.table) - 1, 1 << 16)
        self.bmp[:within] = self.table[:within]

    def encode(self, text: str) -> np.ndarray:
        if self.ascii is not None and text.isascii():  # isascii is O(1) on str
            return np.frombuffer(text.encode("ascii").translate(self.ascii), np.uint8).astype(self.dtype)
        units = text.encode("utf-16-le")
        if len(units) == 2 * len(text):  # no character beyond U+FFFF: one unit per character
            return np.take(self.bmp, np.frombuffer(units, np.uint16))
        codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        return np.take(self.table, np.minimum(codes, len(self.table) - 1))

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(text) for text in texts]


class BpeEncoder:
    """BpeTokenizer.encode, faster: text is cut into pre-tokens in Python (lmzoo.data.pretokens) and each
    distinct pre-token is encoded by the library once and remembered. Text with a character the
    pre-tokenizing cannot place is cut where any tokenizer may cut it, and the pieces with such characters
    go to the library whole."""

    def __init__(self, tokenizer: BpeTokenizer, dtype: type[np.unsignedinteger]) -> None:
        self.backend, self.dtype = tokenizer.backend, dtype
        self._forget()

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(text) for text in texts]

    def encode(self, text: str) -> np.ndarray:
        found = pretokens(text)
        if found is not None:
            return self._ids(found)
        parts: list[np.ndarray] = []
        for placed, group in itertools.groupby(safe_pieces(text, ASCII_RUN), key=_placed):
            run = "".join(group)
            found = pretokens(run) if placed else None
            parts.append(self._ids(found) if found is not None else self._library(run))
        return np.concatenate(parts)

    def _library(self, text: str) -> np.ndarray:
        return np.asarray(self.backend.encode(text, add_special_tokens=False).ids, dtype=self.dtype)

    def _forget(self) -> None:
        """The remembered pre-tokens: the ids of the i-th are flat[starts[i] : starts[i] + counts[i]]."""
        self.index: dict[str, int] = {}
        self.flat = np.zeros(0, dtype=self.dtype)
        self.starts = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)

    def _ids(self, pieces: list[str]) -> np.ndarray:
        missing = list(set(pieces).difference(self.index))
        if missing:
            if len(self.index) + len(missing) > KNOWN_PIECES:
                self._forget()
                missing = list(set(pieces))
            self._remember(missing)
        which = np.fromiter(map(self.index.__getitem__, pieces), dtype=np.int64, count=len(pieces))
        return spans(self.flat, self.starts, self.counts, which)

    def _remember(self, pieces: list[str]) -> None:
        encoded = [e.ids for e in self.backend.encode_batch_fast(pieces, add_special_tokens=False)]
        counts = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        self.index.update(zip(pieces, range(len(self.index), len(self.index) + len(pieces)), strict=True))
        self.starts = np.concatenate([self.starts, len(self.flat) + np.cumsum(counts) - counts])
        self.counts = np.concatenate([self.counts, counts])
        flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=self.dtype, count=int(counts.sum()))
        self.flat = np.concatenate([self.flat, flat])


def spans(flat: np.ndarray, starts: np.ndarray, counts: np.ndarray, which: np.ndarray) -> np.ndarray:
    """flat[starts[i] : starts[i] + counts[i]] for each i of `which`, one after the other."""
    counts, starts = counts[which], starts[which]
    # The k-th span goes to positions first[k] ... first[k] + counts[k] - 1 of the result.
    first = np.cumsum(counts) - counts
    return flat[np.repeat(starts - first, counts) + np.arange(int(counts.sum()), dtype=counts.dtype)]


def _placed(piece: str) -> bool:
    return pretokens(piece) is not None


class PlainEncoder:
    """Tokenizer.encode itself (run in worker processes)."""

    def __init__(self, tokenizer: Tokenizer, dtype: type[np.unsignedinteger]) -> None:
        self.tokenizer, self.dtype = tokenizer, dtype

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(self.tokenizer.encode(text), dtype=self.dtype) for text in texts]


Encoder = Callable[[list[str]], list[np.ndarray]]


def encoder_for(tokenizer: Tokenizer, dtype: type[np.unsignedinteger]) -> Encoder:
    """The fastest encoder of `tokenizer` in this process."""
    if isinstance(tokenizer, CharTokenizer):
        return CharEncoder(tokenizer, dtype)
    if isinstance(tokenizer, BpeTokenizer):
        return BpeEncoder(tokenizer, dtype)
    return PlainEncoder(tokenizer, dtype)


def in_processes(tokenizer: Tokenizer) -> bool:
    """Whether encoding needs worker processes to use every core (the vectorised char encoder does not)."""
    return not isinstance(tokenizer, CharTokenizer)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


# ---- worker processes -----------------------------------------------------------------------------

_WORKER: Encoder | None = None


def _start_worker(payload: dict[str, Any], dtype: str) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the workers share the machine
    _WORKER = encoder_for(tokenizer_from_dict(payload), np.dtype(dtype).type)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    assert _WORKER is not None
    return _WORKER(texts)


def encode_all(
    tokenizer: Tokenizer,
    dtype: type[np.unsignedinteger],
    items: Iterable[tuple[T, list[str]]],
    workers: int = 1,
) -> Iterator[tuple[T, list[np.ndarray]]]:
    """(tag, ids of each text) for each (tag, texts) of `items`, in order; with workers > 1 and a tokenizer
    that needs them, `workers` processes encode while this one reads ahead at most 2 items per worker."""
    if workers <= 1 or not in_processes(tokenizer):
        encode = encoder_for(tokenizer, dtype)
        for tag, texts in items:
            yield tag, encode(texts)
        return
    setup = (tokenizer.payload(), np.dtype(dtype).str)
    yield from in_workers(_encode_in_worker, items, workers, _start_worker, setup)


def in_threads(
    function: Callable[[A], R], items: Iterable[tuple[T, A]], workers: int
) -> Iterator[tuple[T, R]]:
    """(tag, function(argument)) for each (tag, argument) of `items`, in order, computed by `workers`
    threads while this one reads ahead: for functions that spend most of their time outside the GIL."""
    with ThreadPoolExecutor(workers) as pool:
        yield from _ahead(pool, function, items, workers)


def in_workers(
    function: Callable[[A], R],
    items: Iterable[tuple[T, A]],
    workers: int,
    initializer: Callable[..., None],
    initargs: tuple[Any, ...],
) -> Iterator[tuple[T, R]]:
    """(tag, function(argument)) for each (tag, argument) of `items`, in order, computed by `workers`
    processes (each set up by `initializer(*initargs)`) while this one reads ahead at most 2 items per
    worker."""
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=initializer, initargs=initargs) as pool:
        yield from _ahead(pool, function, items, workers)


def _ahead(
    pool: Executor, function: Callable[[A], R], items: Iterable[tuple[T, A]], workers: int
) -> Iterator[tuple[T, R]]:
    """The results of `function` on `items` from `pool`, in order, with at most 2 items per worker ahead."""
    pending: deque[tuple[T, Future[R]]] = deque()
    try:
        for tag, argument in items:
            pending.append((tag, pool.submit(function, argument)))
            while len(pending) > 2 * workers:
                done_tag, future = pending.popleft()
                yield done_tag, _result(future)
        while pending:
            done_tag, future = pending.popleft()
            yield done_tag, _result(future)
    finally:
        for _, future in pending:
            future.cancel()


def _result(future: Future[R]) -> R:
    try:
        return future.result()
    except (BrokenExecutor, OSError) as err:
        raise DataError(
            f"a tokenizing worker process failed ({type(err).__name__}: {err}); "
            "set data.workers: 1 to tokenize in this process"
        ) from None
