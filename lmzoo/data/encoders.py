"""Encoding large texts fast, to exactly the ids `Tokenizer.encode` gives the same text.

* char: vectorised lookups (a byte translation table for ASCII text, a code-point table otherwise);
* BPE: the `tokenizers` library's batch encoding, which runs on every core;
* word (and any other registered tokenizer): `Tokenizer.encode` in worker processes, one per core.

Texts are cut into pieces only where every tokenizer encodes the pieces as it encodes the whole
(`safe_pieces`), so the ids of a corpus do not depend on how it was read in chunks.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor
from typing import Any, TypeVar

import numpy as np

from lmzoo.data.tokenizer import BpeTokenizer, CharTokenizer, Tokenizer, tokenizer_from_dict
from lmzoo.errors import DataError

T = TypeVar("T")
BPE_PIECE = 1 << 16  # characters per piece of a BPE batch
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

    def encode(self, text: str) -> np.ndarray:
        if self.ascii is not None and text.isascii():
            return np.frombuffer(text.encode("ascii").translate(self.ascii), np.uint8).astype(self.dtype)
        codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        return self.table[np.minimum(codes, len(self.table) - 1)]

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(text) for text in texts]


class BpeEncoder:
    """BpeTokenizer.encode over safe pieces of all the texts, batch-encoded on every core."""

    def __init__(self, tokenizer: BpeTokenizer, dtype: type[np.unsignedinteger]) -> None:
        self.backend, self.dtype = tokenizer.backend, dtype

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        pieces = [safe_pieces(text, BPE_PIECE) for text in texts]
        flat = [piece for group in pieces for piece in group]
        encodings = iter(self.backend.encode_batch_fast(flat, add_special_tokens=False))
        out = []
        for group in pieces:
            ids = [np.asarray(next(encodings).ids, dtype=self.dtype) for _ in group]
            out.append(np.concatenate(ids) if ids else np.zeros(0, self.dtype))
        return out


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
    """Whether encoding needs worker processes to use every core (the vectorised and BPE ones do not)."""
    return not isinstance(tokenizer, (CharTokenizer, BpeTokenizer))


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


# ---- worker processes -----------------------------------------------------------------------------

_WORKER: Encoder | None = None


def _start_worker(payload: dict[str, Any], dtype: str) -> None:
    global _WORKER
    _WORKER = PlainEncoder(tokenizer_from_dict(payload), np.dtype(dtype).type)


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
    payload = tokenizer.payload()
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    pending: deque[tuple[T, Future[list[np.ndarray]]]] = deque()
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(payload, np.dtype(dtype).str)
    ) as pool:
        try:
            for tag, texts in items:
                pending.append((tag, pool.submit(_encode_in_worker, texts)))
                while len(pending) > 2 * workers:
                    done_tag, future = pending.popleft()
                    yield done_tag, _result(future)
            while pending:
                done_tag, future = pending.popleft()
                yield done_tag, _result(future)
        finally:
            for _, future in pending:
                future.cancel()


def _result(future: Future[list[np.ndarray]]) -> list[np.ndarray]:
    try:
        return future.result()
    except (BrokenExecutor, OSError) as err:
        raise DataError(
            f"a tokenizing worker process failed ({type(err).__name__}: {err}); "
            "set data.workers: 1 to tokenize in this process"
        ) from None
