"""Fitting a tokenizer on a corpus of any size: on a bounded, deterministic sample of its training split.

Word and BPE vocabularies are fitted on at most `tokenizer.fit_bytes` characters: the whole split when it
is smaller (so small corpora get exactly the tokenizer they always got), else every k-th block of about
SAMPLE_BLOCK characters, evenly spread over the split. Word counts and BPE's pre-token counts come from
every core's process (lmzoo.data.bpe_pass for BPE), or from encoding itself (lmzoo.data.one_pass). A
char vocabulary comes from one cheap full pass (over the bytes, for plain text files). The fitted
tokenizer is kept in the corpus's cache with the scan it saw.
"""

from __future__ import annotations

import codecs
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lmzoo.config.schema import TokenizerConfig
from lmzoo.data.bpe_pass import bpe_counts
from lmzoo.data.cache import digest, read_json, write_json
from lmzoo.data.encoders import in_threads, in_workers
from lmzoo.data.sample import fitted_splits, sample_blocks, sample_stride, separator_text
from lmzoo.data.scan import Say, Scanned
from lmzoo.data.sources import CHUNK, Piece, Source, raw_blocks
from lmzoo.data.tokenizer import (
    BpeTokenizer,
    Tokenizer,
    WordTokenizer,
    fit_tokenizer,
    tokenizer_from_dict,
)
from lmzoo.errors import DataError

JOB_CHARS = 1 << 22  # characters of the sample per word-counting job


def _fit_text(corpus: Scanned, config: TokenizerConfig, workers: int) -> str:
    """The text a tokenizer of `config` is fitted on: for char, every character of the fitted splits (one
    full pass, on `workers` threads); otherwise the sample of `_fit_sample`."""
    if config.kind == "char":
        plain = _plain_text(corpus, config)
        found = _raw_characters(*plain) if plain is not None else None
        if found is None:
            found = _characters((piece for _, piece in _fitted_pieces(corpus, config)), workers)
        return "".join(sorted(found | set(separator_text(corpus))))
    return "".join(_fit_sample(corpus, config))


def _fitted_pieces(corpus: Scanned, config: TokenizerConfig) -> Iterator[tuple[str, Piece]]:
    wanted = fitted_splits(config)
    return ((split, piece) for split, piece in corpus.route() if split in wanted)


def _fit_sample(corpus: Scanned, config: TokenizerConfig) -> Iterator[str]:
    """The sample a word or BPE tokenizer is fitted on, in parts: at most `fit_bytes` characters, all of the
    fitted splits when they are smaller, else every k-th block of about SAMPLE_BLOCK characters; then the
    document separator."""
    limit, stride = config.fit_bytes, sample_stride(corpus, config)
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
    yield separator_text(corpus)


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


def _characters(pieces: Iterator[Piece], workers: int = 1) -> set[str]:
    """Every character of the pieces, looked for in jobs of about JOB_CHARS characters by `workers` threads
    (numpy's histograms release the GIL while this thread reads on)."""
    finder = _CharacterFinder()
    jobs = ((None, text) for text in _joined((piece.text for piece in pieces), JOB_CHARS))
    results = in_threads(finder, jobs, workers) if workers > 1 else ((None, finder(text)) for _, text in jobs)
    for _, characters in results:
        finder.add(characters)
    return finder.found


class _CharacterFinder:
    """The set of characters of a text, fast: ASCII text has the characters already found deleted first,
    other text within U+FFFF gets a histogram of its UTF-16 code units (far faster than set())."""

    def __init__(self) -> None:
        self.found: set[str] = set()
        self.known = b""  # the ASCII characters of `found`, deleted from ASCII text before looking

    def add(self, characters: set[str]) -> None:
        if not characters <= self.found:
            self.found |= characters
            self.known = bytes(sorted(ord(c) for c in self.found if ord(c) < 128))

    def __call__(self, text: str) -> set[str]:
        if text.isascii():
            return set(text.encode("ascii").translate(None, self.known).decode("ascii"))
        units = text.encode("utf-16-le")
        if len(units) == 2 * len(text):  # no character beyond U+FFFF: one unit per character
            return set(map(chr, np.flatnonzero(np.bincount(np.frombuffer(units, np.uint16)))))
        return set(text)


def _plain_text(corpus: Scanned, config: TokenizerConfig) -> tuple[list[Source], int | None] | None:
    """Where the fitted splits' text lies when it is all in plain text files: the files, in order, and how
    many line ends of them to read (None: all); None when some of it is in JSONL or tables."""
    sources = corpus.sources()
    roles = list(sources) if config.fit_on == "all" else ["train"]
    fitted = [source for role in roles for source in sources[role]]
    if not all(source.kind == "text" for source in fitted):
        return None
    if config.fit_on == "all" or corpus.plan.unit == "tokens":  # the token tail is carved after encoding
        return fitted, None
    if corpus.plan.unit == "documents":  # a text file is one document
        return fitted[: corpus.counts["train"]], None
    return fitted, corpus.counts["train"]


def _raw_characters(sources: list[Source], line_ends: int | None, size: int = CHUNK) -> set[str] | None:
    """The characters of the sources' text up to their `line_ends`-th line end (None: all of it), read from
    their bytes without decoding most of them: the ASCII bytes already found are deleted and only the rest
    is decoded (deleting ASCII bytes keeps multi-byte characters whole). None where the bytes are not the
    text: a "\r" (line ends are made "\n") or bytes that are not UTF-8 (the encoding pass names them)."""
    finder, left = _CharacterFinder(), line_ends
    for source in sources:
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            for block in raw_blocks(source, size=size):
                if left is not None:
                    ends = block.count(b"\n")
                    if ends >= left:
                        block = block[: _after_line_end(block, left)] if left else b""
                    left -= min(ends, left)
                if b"\r" in block:
                    return None
                rest = block.translate(None, finder.known)
                if rest:
                    finder.add(finder(decoder.decode(rest)))
                if left == 0:
                    return finder.found
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return None
    return finder.found


def _after_line_end(data: bytes, count: int) -> int:
    """The position right after the `count`-th b"\n" of `data` (count >= 1)."""
    parts = data.split(b"\n", count)
    return len(data) - len(parts[-1])


def _joined(texts: Iterator[str], size: int) -> Iterator[str]:
    """The texts joined into strings of about `size` characters."""
    parts: list[str] = []
    length = 0
    for text in texts:
        parts.append(text)
        length += len(text)
        if length >= size:
            yield "".join(parts)
            parts, length = [], 0
    if parts:
        yield "".join(parts)


def _blocks(text: str) -> Iterator[str]:
    return (text[start:end] for start, end in sample_blocks(text))


def _fit_path(corpus: Scanned, config: TokenizerConfig) -> Path:
    return corpus.plan.root / f"fit-{digest({'tokenizer': config.model_dump(mode='json')})[:16]}.json"


def saved_fit(corpus: Scanned, config: TokenizerConfig) -> Tokenizer | None:
    """The tokenizer `config` describes as fitted on this corpus before (None: not fitted since the scan)."""
    saved = read_json(_fit_path(corpus, config))
    if saved is not None and saved.get("scan") == corpus.id:
        return tokenizer_from_dict(saved["tokenizer"])
    return None


def keep_fit(corpus: Scanned, config: TokenizerConfig, tokenizer: Tokenizer) -> None:
    """Keep `tokenizer` in the corpus's cache as `config` fitted on it (with the scan it saw)."""
    write_json(_fit_path(corpus, config), {"scan": corpus.id, "tokenizer": tokenizer.payload()})


def fitted_tokenizer(corpus: Scanned, config: TokenizerConfig, *, say: Say, workers: int = 1) -> Tokenizer:
    """The tokenizer `config` describes, fitted on this corpus (kept in the cache with the scan it saw);
    a word vocabulary is counted by `workers` processes."""
    saved = saved_fit(corpus, config)
    if saved is not None:
        return saved
    started = time.perf_counter()
    if config.kind == "bpe":
        tokenizer: Tokenizer = BpeTokenizer.from_counts(bpe_counts(corpus, config, workers), config)
    elif config.kind == "word" and workers > 1:
        counts = _word_counts(corpus, config, workers)
        if not counts and not any(part.strip() for part in _fit_sample(corpus, config)):
            raise DataError("cannot fit a tokenizer on empty text")
        tokenizer = WordTokenizer.from_counts(counts, config)
    else:
        tokenizer = fit_tokenizer(config, _fit_text(corpus, config, workers))
    seconds = time.perf_counter() - started
    if seconds > 2:
        say(f"lmzoo: fitted the {config.kind} tokenizer ({tokenizer.vocab_size:,} tokens) in {seconds:.1f} s")
    keep_fit(corpus, config, tokenizer)
    return tokenizer
