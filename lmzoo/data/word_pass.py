"""A word vocabulary fitted while the corpus is encoded: one pass over the text instead of two.

Fitting a word vocabulary and encoding split the same text into the same words. Here each job's texts are
split once, in the worker processes: each word is numbered by its place among the job's distinct words,
and the words the fit sample takes (all of the fitted splits' text, or its every k-th block) are counted.
This process gives every distinct word of the corpus a number, adds up the counts and writes the numbers
(uint32) to provisional files. The vocabulary is then made from the counts as `WordTokenizer.from_counts`
makes it from the fit's, and one read of the provisional files writes the token files: the same tokenizer
and files as fitting first and encoding after (tests compare them).

The corpus is left to two passes (`NotInOnePass`) where the fit sample is a small share of the text
(every MOST_STRIDE-th block or less: the fit is then a small share of the time too), where the corpus has
more than MOST_WORDS distinct words (this process holds them all), and where a piece of text is cut
inside a line (a line of more than 16 MB), which the fit counts differently.
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
from lmzoo.data.fit import fitted_splits, sample_blocks, sample_stride, separator_text
from lmzoo.data.scan import Scanned
from lmzoo.data.token_files import Encoded, Jobs, SplitStats, Tag, carve_token_tail, write_splits
from lmzoo.data.tokenizer import EOS, MARK, WordTokenizer
from lmzoo.errors import DataError

LINE_END = 0  # a line end's number (it becomes <eos>; line ends are not counted)
PROVISIONAL = ".words"  # the provisional files' suffix
REMAP_BLOCK = 1 << 22  # numbers read at a time when writing the token files
MOST_WORDS = 1 << 22  # distinct words this process numbers before leaving the corpus to two passes
MOST_STRIDE = 4  # one pass while the fit sample is at least every 4th block: beyond, the fit is a small share


class NotInOnePass(Exception):
    """The text cannot be counted piece by piece as the fit counts it."""


Numbered = tuple[list[str], list[np.ndarray], np.ndarray]  # distinct words, numbers per text, counts


Parts = list[tuple[int, int, bool]]  # a text cut in parts: (start, end, whether the fit counts it)


def number_words(splitter: WordTokenizer, texts: list[str], parts: list[Parts]) -> Numbered:
    """Each text's words as numbers: 0 for a line end, else 1 + the word's place among the distinct words
    of all `texts`; with how often each number occurs in the counted parts. Parts end at line ends (blocks
    of the fit sample), so splitting them one by one splits the text as a whole."""
    pieces = [
        (*_looked_up(splitter, text if len(cuts) == 1 else text[start:end]), counted)
        for text, cuts in zip(texts, parts, strict=True)
        for start, end, counted in cuts
    ]
    mark_is_word = any(end == EOS and MARK in words for words, end, _ in pieces)  # texts that hold MARK
    line_ends = {EOS} if mark_is_word else {EOS, MARK}
    chained = itertools.chain.from_iterable(words for words, _, _ in pieces)
    distinct = [w for w in dict.fromkeys(chained) if w not in line_ends]
    numbers = dict(zip(distinct, range(1, len(distinct) + 1), strict=True))
    numbers.update(dict.fromkeys(line_ends, LINE_END))
    marked = {**numbers, MARK: LINE_END} if mark_is_word else numbers
    ids = [
        np.fromiter(map((marked if end == MARK else numbers).__getitem__, words), np.uint32, len(words))
        for words, end, _ in pieces
    ]
    arrays, first = [], 0
    for cuts in parts:
        arrays.append(ids[first] if len(cuts) == 1 else np.concatenate(ids[first : first + len(cuts)]))
        first += len(cuts)
    fitted = [numbered for numbered, (_, _, counted) in zip(ids, pieces, strict=True) if counted]
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


def _number_in_worker(job: tuple[list[str], list[Parts]]) -> Numbered:
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
        if len(self.words) + len(new) > MOST_WORDS:  # memory grows with the corpus's distinct words
            raise NotInOnePass
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


def in_one_pass(corpus: Scanned, config: TokenizerConfig) -> bool:
    """Whether a tokenizer of `config` is fitted while `corpus` is encoded: a word vocabulary whose fit
    sample is a large share of the text (at least every MOST_STRIDE-th block)."""
    return config.kind == "word" and sample_stride(corpus, config) <= MOST_STRIDE


def encode_in_one_pass(
    corpus: Scanned, config: TokenizerConfig, scratch: Path, *, workers: int, progress: bool
) -> tuple[WordTokenizer, Vocabulary, dict[str, SplitStats]]:
    """Write every split's words as corpus numbers to <split>.words in `scratch`; return the tokenizer
    fitted on the way, the numbering and what each split holds."""
    splitter, vocabulary, fitted = WordTokenizer.splitter(config), Vocabulary(), _Fitted(corpus, config)
    # The fit sample ends with the separator's text: its words are counted once.
    separator = separator_text(corpus)
    distinct, [ids], counts = number_words(splitter, [separator], [[(0, len(separator), True)]])
    table = vocabulary.add(distinct, counts)
    document_end = corpus.plan.data.document_end
    between = np.asarray([LINE_END], dtype=np.uint32) if document_end == EOS else np.take(table, ids)

    def encode(jobs: Jobs) -> Encoded:
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
    if not fitted.text and not separator.strip():
        raise DataError("cannot fit a tokenizer on empty text")
    return vocabulary.tokenizer(config), vocabulary, stats


class _Fitted:
    """Which parts of which texts the fit counts, as the fit sample takes them: the fitted splits' text,
    every k-th block of it when it is larger than `fit_bytes`, until `fit_bytes` characters are taken."""

    def __init__(self, corpus: Scanned, config: TokenizerConfig) -> None:
        self.splits, self.limit = fitted_splits(config), config.fit_bytes
        self.stride = sample_stride(corpus, config)
        self.size = self.index = 0  # characters taken; blocks passed
        self.text = False  # whether any taken text is not whitespace

    def flag(self, jobs: Jobs) -> Iterator[tuple[list[Tag], tuple[list[str], list[Parts]]]]:
        for tags, texts in jobs:
            parts = [
                self._parts(split, ends, text) for (split, ends, _), text in zip(tags, texts, strict=True)
            ]
            yield tags, (texts, parts)

    def _parts(self, split: str, ends: bool, text: str) -> Parts:
        if split not in self.splits or self.size >= self.limit:
            return [(0, len(text), False)]
        if not ends and not text[-1:].isspace():
            raise NotInOnePass
        sampled = text if not ends or text.endswith("\n") else text + "\n"  # as the fit sample has it
        if self.stride == 1:
            self.size += len(sampled)
            parts = [(0, len(text), True)]
        else:
            parts = []
            for start, end in sample_blocks(sampled):
                taken = self.index % self.stride == 0
                self.size += (end - start) * taken
                self.index += 1
                if start < len(text):  # (not the line end the sample adds)
                    parts.append((start, min(end, len(text)), taken))
        self.text = self.text or any(taken and b > a and not text[a:b].isspace() for a, b, taken in parts)
        return parts or [(0, len(text), False)]


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
