"""A word vocabulary fitted while the corpus is encoded: one pass over the text instead of two.

When the fit sample is all of the fitted text (corpora within `tokenizer.fit_bytes`), fitting a word
vocabulary and encoding split the same text into the same words. Here each job's texts are split once, in
the worker processes: each word is numbered by its place among the job's distinct words, and the words of
fitted text are counted. This process gives every distinct word of the corpus a number, adds up the
counts and writes the numbers (uint32) to provisional files. The vocabulary is then made from the counts
as `WordTokenizer.from_counts` makes it from the fit's, and one read of the provisional files writes the
token files: the same tokenizer and files as fitting first and encoding after (a test compares them).

Counting text piece by piece counts what the fit counts when every piece ends at whitespace or at the
end of a document; a piece cut inside a line (a line of more than 16 MB) raises `NotInOnePass`, and the
corpus is prepared in two passes.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lmzoo.config.schema import TokenizerConfig
from lmzoo.data.corpus import SPLITS, CorpusPlan
from lmzoo.data.encoders import id_dtype, in_workers
from lmzoo.data.fit import fitted_splits, separator_text
from lmzoo.data.scan import Scanned
from lmzoo.data.token_files import Jobs, SplitStats, Tag, carve_token_tail, write_splits
from lmzoo.data.tokenizer import EOS, MARK, WordTokenizer
from lmzoo.errors import DataError

LINE_END = 0  # a line end's number (it becomes <eos>; line ends are not counted)
PROVISIONAL = ".words"  # the provisional files' suffix
REMAP_BLOCK = 1 << 22  # numbers read at a time when writing the token files


class NotInOnePass(Exception):
    """The text cannot be counted piece by piece as the fit counts it."""


Numbered = tuple[list[str], list[np.ndarray], np.ndarray]  # distinct words, numbers per text, counts


def number_words(splitter: WordTokenizer, texts: list[str], counted: list[bool]) -> Numbered:
    """Each text's words as numbers: 0 for a line end, else 1 + the word's place among the distinct words
    of all `texts`; with how often each number occurs in the counted texts."""
    looked_up = [_looked_up(splitter, text) for text in texts]
    mark_is_word = any(end == EOS and MARK in words for words, end in looked_up)  # texts that hold MARK
    line_ends = {EOS} if mark_is_word else {EOS, MARK}
    chained = itertools.chain.from_iterable(words for words, _ in looked_up)
    distinct = [w for w in dict.fromkeys(chained) if w not in line_ends]
    numbers = dict(zip(distinct, range(1, len(distinct) + 1), strict=True))
    numbers.update(dict.fromkeys(line_ends, LINE_END))
    marked = {**numbers, MARK: LINE_END} if mark_is_word else numbers
    arrays = [
        np.fromiter(map((marked if end == MARK else numbers).__getitem__, words), np.uint32, len(words))
        for words, end in looked_up
    ]
    fitted = [ids for ids, count in zip(arrays, counted, strict=True) if count]
    counts = np.bincount(np.concatenate(fitted), minlength=len(distinct) + 1) if fitted else np.zeros(1, int)
    counts[LINE_END] = 0
    return distinct, arrays, counts


def _looked_up(splitter: WordTokenizer, text: str) -> tuple[list[str], str]:
    """The words `WordTokenizer.encode` looks up, in order, and the word that stands for a line end in
    them: MARK, or <eos> where the text or the filters hold MARK (then MARK may be a word like any other)."""
    marked = splitter.marked_words(text)
    return (splitter.words(text), EOS) if marked is None else (marked, MARK)


_SPLITTER: WordTokenizer | None = None


def _start_worker(config: TokenizerConfig) -> None:
    global _SPLITTER
    _SPLITTER = WordTokenizer.splitter(config)


def _number_in_worker(job: tuple[list[str], list[bool]]) -> Numbered:
    assert _SPLITTER is not None
    return number_words(_SPLITTER, *job)


class Vocabulary:
    """The corpus's distinct words, numbered in the order they are first met, with their counts."""

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}
        self.words: list[str] = [EOS]  # number 0: a line end
        self.counts = np.zeros(1, dtype=np.int64)

    def add(self, distinct: list[str], counts: np.ndarray) -> np.ndarray:
        """Take in a job's distinct words and counts; return its numbers -> corpus numbers."""
        new = [w for w in distinct if w not in self.numbers]
        self.numbers.update(zip(new, range(len(self.words), len(self.words) + len(new)), strict=True))
        self.words.extend(new)
        self.counts = np.concatenate([self.counts, np.zeros(len(new), dtype=np.int64)])
        table = np.zeros(len(distinct) + 1, dtype=np.uint32)
        table[1:] = np.fromiter(map(self.numbers.__getitem__, distinct), np.uint32, len(distinct))
        self.counts[table[1 : len(counts)]] += counts[1:]  # the numbers of a job are distinct
        return table

    def tokenizer(self, config: TokenizerConfig) -> WordTokenizer:
        counts = Counter({w: int(c) for w, c in zip(self.words[1:], self.counts[1:], strict=True) if c})
        return WordTokenizer.from_counts(counts, config)


def encode_in_one_pass(
    corpus: Scanned, config: TokenizerConfig, scratch: Path, *, workers: int, progress: bool
) -> tuple[WordTokenizer, Vocabulary, dict[str, SplitStats]]:
    """Write every split's words as corpus numbers to <split>.words in `scratch`; return the tokenizer
    fitted on the way, the numbering and what each split holds."""
    splitter, vocabulary, fitted = WordTokenizer.splitter(config), Vocabulary(), _Fitted(config)
    # The fit sample ends with the separator's text: its words are counted once.
    distinct, [ids], counts = number_words(splitter, [separator_text(corpus)], [True])
    table = vocabulary.add(distinct, counts)
    document_end = corpus.plan.data.document_end
    between = np.asarray([LINE_END], dtype=np.uint32) if document_end == EOS else np.take(table, ids)

    def encode(jobs: Jobs) -> Iterator[tuple[list[Tag], list[np.ndarray]]]:
        flagged = fitted.flag(jobs)
        results = (
            in_workers(_number_in_worker, flagged, workers, _start_worker, (config,))
            if workers > 1
            else ((tags, number_words(splitter, *job)) for tags, job in flagged)
        )
        for tags, (distinct, arrays, counts) in results:
            table = vocabulary.add(distinct, counts)
            yield tags, [np.take(table, ids) for ids in arrays]

    stats = write_splits(corpus, scratch, encode, between, progress=progress, suffix=PROVISIONAL)
    if not fitted.text and not separator_text(corpus).strip():
        raise DataError("cannot fit a tokenizer on empty text")
    return vocabulary.tokenizer(config), vocabulary, stats


class _Fitted:
    """Which texts the fit counts: those of the fitted splits, until `fit_bytes` characters are taken (as
    the fit sample takes them)."""

    def __init__(self, config: TokenizerConfig) -> None:
        self.splits, self.limit = fitted_splits(config), config.fit_bytes
        self.size, self.text = 0, False  # characters taken; whether any is not whitespace

    def flag(self, jobs: Jobs) -> Iterator[tuple[list[Tag], tuple[list[str], list[bool]]]]:
        for tags, texts in jobs:
            counted = []
            for (split, ends, _), text in zip(tags, texts, strict=True):
                count = split in self.splits and self.size < self.limit
                if count:
                    if not ends and not text[-1:].isspace():
                        raise NotInOnePass
                    self.size += len(text) + (ends and not text.endswith("\n"))
                    self.text = self.text or (bool(text) and not text.isspace())
                counted.append(count)
            yield tags, (texts, counted)


def write_token_files(
    scratch: Path,
    directory: Path,
    tokenizer: WordTokenizer,
    vocabulary: Vocabulary,
    stats: dict[str, SplitStats],
    plan: CorpusPlan,
) -> dict[str, SplitStats]:
    """The provisional files of `scratch` as token files in `directory` (then carved, for a token tail)."""
    dtype = id_dtype(tokenizer.vocab_size)
    stoi, unk = tokenizer.stoi, tokenizer.unk_id
    table = np.fromiter((stoi.get(w, unk) for w in vocabulary.words), dtype, len(vocabulary.words))
    table[LINE_END] = tokenizer.eos_id
    for split in SPLITS:
        with (
            open(scratch / f"{split}{PROVISIONAL}", "rb") as source,
            open(directory / f"{split}.bin", "wb") as out,
        ):
            while block := source.read(4 * REMAP_BLOCK):
                out.write(np.take(table, np.frombuffer(block, dtype=np.uint32)).tobytes())
    if plan.unit == "tokens":
        carve_token_tail(plan, directory, stats, np.dtype(dtype).itemsize)
    return stats
