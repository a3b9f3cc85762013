"""Fitting a tokenizer on a corpus of any size: on a bounded, deterministic sample of its training split.

Word and BPE vocabularies are fitted on at most `tokenizer.fit_bytes` characters: the whole split when it
is smaller (so small corpora get exactly the tokenizer they always got), else every k-th block of about
SAMPLE_BLOCK characters, evenly spread over the split. Word counts come from every core's process. A char
vocabulary comes from one cheap full pass. The fitted tokenizer is kept in the corpus's cache with the
scan it saw.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np

from lmzoo.config.schema import TokenizerConfig
from lmzoo.data.cache import digest, read_json, write_json
from lmzoo.data.corpus import SPLITS
from lmzoo.data.encoders import in_workers
from lmzoo.data.scan import Say, Scanned
from lmzoo.data.sources import Piece
from lmzoo.data.tokenizer import EOS, Tokenizer, WordTokenizer, fit_tokenizer, tokenizer_from_dict
from lmzoo.errors import DataError

SAMPLE_BLOCK = 1 << 16  # the fit sample is made of blocks of about this many characters
JOB_CHARS = 1 << 22  # characters of the sample per word-counting job


def _fit_text(corpus: Scanned, config: TokenizerConfig) -> str:
    """The text a tokenizer of `config` is fitted on: for char, every character of the fitted splits (one
    full pass); otherwise the sample of `_fit_sample`."""
    if config.kind == "char":
        separator = _separator(corpus)
        return "".join(sorted(_characters(p for _, p in _fitted_pieces(corpus, config)) | set(separator)))
    return "".join(_fit_sample(corpus, config))


def _fitted_splits(config: TokenizerConfig) -> set[str]:
    return {"train"} if config.fit_on == "train" else set(SPLITS)


def _fitted_pieces(corpus: Scanned, config: TokenizerConfig) -> Iterator[tuple[str, Piece]]:
    wanted = _fitted_splits(config)
    return ((split, piece) for split, piece in corpus.route() if split in wanted)


def _separator(corpus: Scanned) -> str:
    """The text between two documents ("" for <eos>, which is not text)."""
    document_end = corpus.plan.data.document_end
    return "" if document_end == EOS else document_end


def _fit_sample(corpus: Scanned, config: TokenizerConfig) -> Iterator[str]:
    """The sample a word or BPE tokenizer is fitted on, in parts: at most `fit_bytes` characters, all of the
    fitted splits when they are smaller, else every k-th block of about SAMPLE_BLOCK characters; then the
    document separator."""
    limit = config.fit_bytes
    stride = max(1, math.ceil(_fit_bytes_estimate(corpus, _fitted_splits(config)) / limit))
    size = index = 0
    for _, piece in _fitted_pieces(corpus, config):
        text = piece.text if not piece.ends_document or piece.text.endswith("\n") else piece.text + "\n"
        for block in _blocks(text) if stride > 1 else [text]:
            if index % stride == 0:
                yield block
                size += len(block)
            index += 1
        if size >= limit:
            break
    yield _separator(corpus)


def _word_counts(corpus: Scanned, config: TokenizerConfig, workers: int) -> Counter[str]:
    """The word counts of the fit sample, counted by `workers` processes in jobs of about JOB_CHARS
    characters cut at whitespace (where counts add up to those of the whole sample)."""

    def jobs() -> Iterator[tuple[None, str]]:
        parts: list[str] = []
        size = 0
        for part in _fit_sample(corpus, config):
            parts.append(part)
            size += len(part)
            if size >= JOB_CHARS and part[-1:].isspace():
                yield None, "".join(parts)
                parts, size = [], 0
        yield None, "".join(parts)

    counts: Counter[str] = Counter()
    for _, found in in_workers(_count_in_worker, jobs(), workers, _start_counter, (config,)):
        counts.update(found)
    return counts


_SPLITTER: WordTokenizer | None = None


def _start_counter(config: TokenizerConfig) -> None:
    global _SPLITTER
    _SPLITTER = WordTokenizer.splitter(config)


def _count_in_worker(text: str) -> Counter[str]:
    assert _SPLITTER is not None
    return _SPLITTER.count_words(text)


def _characters(pieces: Iterator[Piece]) -> set[str]:
    found: set[str] = set()
    known = b""  # the ASCII characters found so far, deleted from each ASCII chunk before looking
    for piece in pieces:
        text = piece.text
        if text.isascii():
            rest = text.encode("ascii").translate(None, known)
            if rest:
                found |= set(rest.decode("ascii"))
                known = bytes(sorted(ord(c) for c in found if ord(c) < 128))
            continue
        units = text.encode("utf-16-le")
        if len(units) == 2 * len(text):  # within U+FFFF: a histogram of code units, far faster than set()
            found.update(map(chr, np.flatnonzero(np.bincount(np.frombuffer(units, np.uint16)))))
        else:
            found |= set(text)
    return found


def _blocks(text: str) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = text.find("\n", start + SAMPLE_BLOCK)
        end = len(text) if end == -1 else end + 1
        yield text[start:end]
        start = end


def _fit_bytes_estimate(corpus: Scanned, wanted: set[str]) -> float:
    sizes = {role: sum(s.size for s in found) for role, found in corpus.sources().items()}
    total, split = sum(corpus.counts.values()), corpus.plan.data.split
    share = corpus.counts.get("train", 0) / total if total else split[0] / sum(split)
    train_role = sizes["train"] * (1.0 if wanted == set(SPLITS) else share)
    return train_role + sum(size for role, size in sizes.items() if role != "train" and role in wanted)


def fitted_tokenizer(corpus: Scanned, config: TokenizerConfig, *, say: Say, workers: int = 1) -> Tokenizer:
    """The tokenizer `config` describes, fitted on this corpus (kept in the cache with the scan it saw);
    a word vocabulary is counted by `workers` processes."""
    path = corpus.plan.root / f"fit-{digest({'tokenizer': config.model_dump(mode='json')})[:16]}.json"
    saved = read_json(path)
    if saved is not None and saved.get("scan") == corpus.id:
        return tokenizer_from_dict(saved["tokenizer"])
    started = time.perf_counter()
    if config.kind == "word" and workers > 1:
        counts = _word_counts(corpus, config, workers)
        if not counts and not any(part.strip() for part in _fit_sample(corpus, config)):
            raise DataError("cannot fit a tokenizer on empty text")
        tokenizer: Tokenizer = WordTokenizer.from_counts(counts, config)
    else:
        tokenizer = fit_tokenizer(config, _fit_text(corpus, config))
    seconds = time.perf_counter() - started
    if seconds > 2:
        say(f"lmzoo: fitted the {config.kind} tokenizer ({tokenizer.vocab_size:,} tokens) in {seconds:.1f} s")
    write_json(path, {"scan": corpus.id, "tokenizer": tokenizer.payload()})
    return tokenizer
