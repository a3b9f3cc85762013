"""A vocabulary fitted while the corpus is encoded: one pass over the text instead of two.

Fitting a word or BPE vocabulary and encoding cut the same text into the same units (words, or BPE's
pre-tokens). Here each job's texts are cut once, in the worker processes: each unit is numbered by its
place among the job's distinct units, and the units the fit sample takes (all of the fitted splits'
text, or its every k-th block) are counted. This process gives every distinct unit of the corpus a
number, adds up the counts and writes the numbers (uint32) to provisional files. The tokenizer is then
fitted on the counts as fitting first would fit it, and one read of the provisional files writes the
token files: the same tokenizer and files as fitting first and encoding after (tests compare them).
How a kind of tokenizer numbers, fits and writes: lmzoo.data.word_pass, lmzoo.data.bpe_pass.

The corpus is left to two passes (`NotInOnePass`) where the fit sample is a small share of the text
(every MOST_STRIDE-th block or less: the fit is then a small share of the time too), where the corpus has
more than MOST_WORDS distinct units (this process holds them all), and where a kind cannot cut a text as
its fit does (a word vocabulary: a line of more than 16 MB, cut inside; BPE: characters only the
library places).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmzoo.config.schema import TokenizerConfig
from lmzoo.data.corpus import SPLITS, CorpusPlan
from lmzoo.data.encoders import in_workers
from lmzoo.data.sample import FitSample, Parts, sample_stride, separator_text
from lmzoo.data.scan import Scanned
from lmzoo.data.token_files import Encoded, Jobs, SplitStats, Tag, carve_token_tail, write_splits
from lmzoo.data.tokenizer import EOS, Tokenizer
from lmzoo.errors import DataError

LINE_END = 0  # number 0: a word tokenizer's line end, and <eos> between documents
PROVISIONAL = ".words"  # the provisional files' suffix
REMAP_BLOCK = 1 << 22  # numbers read at a time when writing the token files
MOST_WORDS = 1 << 22  # distinct units this process numbers before leaving the corpus to two passes
MOST_STRIDE = 4  # one pass while the fit sample is at least every 4th block: beyond, the fit is a small share


class NotInOnePass(Exception):
    """The text cannot be counted piece by piece as the fit counts it."""


Numbered = tuple[list[str], list[np.ndarray], np.ndarray]  # distinct units, numbers per text, counts
Numbering = Callable[[list[str], list[Parts]], Numbered]
Stats = dict[str, SplitStats]
# (scratch, directory, tokenizer, vocabulary, stats, plan): the provisional files of `scratch` as token
# files in `directory` (then carved, for a token tail); returns what each split holds
Writer = Callable[[Path, Path, Tokenizer, "Vocabulary", Stats, CorpusPlan], Stats]


@dataclass(frozen=True)
class OnePass:
    """What one kind of tokenizer brings to the pass (module-level functions: workers receive them)."""

    numbering: Callable[[TokenizerConfig], Numbering]  # how a job's texts are cut, numbered and counted
    fit: Callable[[Vocabulary, TokenizerConfig], Tokenizer]  # the tokenizer, from the counts
    write: Writer  # the provisional files as token files
    whole_lines: bool  # whether the fit must see whole lines (a text cut inside a line: two passes)


def first_numbered(
    groups: list[list[str]], line_ends: tuple[str, ...] = ()
) -> tuple[list[str], list[np.ndarray]]:
    """The distinct strings of `groups` but `line_ends`, in the order they first occur, and each group as
    numbers: 1 + the string's place among them (LINE_END for a line end)."""
    numbers = dict.fromkeys(line_ends, LINE_END)  # (first: left out of the distinct strings below)
    occurrence = itertools.count(1)
    # setdefault numbers each string by its first occurrence in one C-level pass; then 1, 2, ... by that
    found = [
        np.fromiter(map(numbers.setdefault, group, occurrence), np.int64, len(group)) for group in groups
    ]
    distinct = list(numbers)[len(line_ends) :]
    renumbered = np.zeros(next(occurrence), dtype=np.uint32)
    places = np.fromiter(numbers.values(), np.int64, len(numbers))[len(line_ends) :]
    renumbered[places] = np.arange(1, len(distinct) + 1, dtype=np.uint32)
    return distinct, [renumbered[ids] for ids in found]


class Vocabulary:
    """The corpus's distinct units, numbered in the order they are first met, with their counts."""

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}
        self.words: list[str] = [EOS]  # number 0: LINE_END
        self.counts = np.zeros(1, dtype=np.int64)

    def add(self, distinct: list[str], counts: np.ndarray) -> np.ndarray:
        """Take in a job's distinct units and counts; return its numbers -> corpus numbers."""
        new = [w for w in distinct if w not in self.numbers]
        if len(self.words) + len(new) > MOST_WORDS:  # memory grows with the corpus's distinct units
            raise NotInOnePass
        self.numbers.update(zip(new, range(len(self.words), len(self.words) + len(new)), strict=True))
        self.words.extend(new)
        self.counts = np.concatenate([self.counts, np.zeros(len(new), dtype=np.int64)])
        table = np.zeros(len(distinct) + 1, dtype=np.uint32)
        table[1:] = np.fromiter(map(self.numbers.__getitem__, distinct), np.uint32, len(distinct))
        self.counts[table[1 : len(counts)]] += counts[1:]  # the numbers of a job are distinct
        return table

    def counted(self) -> dict[str, int]:
        """Each unit the fit counted, with its count."""
        return {w: int(c) for w, c in zip(self.words[1:], self.counts[1:], strict=True) if c}


def in_one_pass(corpus: Scanned, config: TokenizerConfig) -> bool:
    """Whether a tokenizer of `config` is fitted while `corpus` is encoded: a word or BPE vocabulary whose
    fit sample is a large share of the text (at least every MOST_STRIDE-th block)."""
    return config.kind in ("word", "bpe") and sample_stride(corpus, config) <= MOST_STRIDE


def encode_in_one_pass(
    corpus: Scanned, config: TokenizerConfig, scratch: Path, kind: OnePass, *, workers: int, progress: bool
) -> tuple[Tokenizer, Vocabulary, dict[str, SplitStats]]:
    """Write every split's units as corpus numbers to <split>.words in `scratch`; return the tokenizer
    fitted on the way, the numbering and what each split holds."""
    number, vocabulary = kind.numbering(config), Vocabulary()
    fitted = FitSample(corpus, config)
    # The fit sample ends with the separator's text: its units are counted once.
    separator = separator_text(corpus)
    distinct, [ids], counts = number([separator], [[(0, len(separator), True)]])
    table = vocabulary.add(distinct, counts)
    document_end = corpus.plan.data.document_end
    between = np.asarray([LINE_END], dtype=np.uint32) if document_end == EOS else np.take(table, ids)

    def flag(jobs: Jobs) -> Iterator[tuple[list[Tag], tuple[list[str], list[Parts]]]]:
        for job in fitted.flag(jobs):
            if kind.whole_lines and fitted.cut_line:  # counted part by part, the fit would differ
                raise NotInOnePass
            yield job

    def encode(jobs: Jobs) -> Encoded:
        flagged = flag(jobs)
        results = (
            in_workers(_number_in_worker, flagged, workers, _start_worker, (kind.numbering, config))
            if workers > 1
            else ((tags, number(*job)) for tags, job in flagged)
        )
        for tags, (distinct, arrays, counts) in results:
            table = vocabulary.add(distinct, counts)
            yield tags, [np.take(table, ids) for ids in arrays]

    stats = write_splits(corpus, scratch, encode, between, progress=progress, suffix=PROVISIONAL)
    if not fitted.text and not separator.strip():
        raise DataError("cannot fit a tokenizer on empty text")
    return kind.fit(vocabulary, config), vocabulary, stats


_NUMBER: Numbering | None = None


def _start_worker(numbering: Callable[[TokenizerConfig], Numbering], config: TokenizerConfig) -> None:
    global _NUMBER
    _NUMBER = numbering(config)


def _number_in_worker(job: tuple[list[str], list[Parts]]) -> Numbered:
    assert _NUMBER is not None
    return _NUMBER(*job)


def write_remapped(
    scratch: Path,
    directory: Path,
    stats: Stats,
    plan: CorpusPlan,
    remap: Callable[[np.ndarray], np.ndarray],
    dtype: type[np.unsignedinteger],
) -> Stats:
    """The provisional files of `scratch` as token files in `directory`: each block of numbers written as
    `remap` of it (ids of `dtype`); the token tail then carved. Returns what each split holds."""
    for split in SPLITS:
        written = 0
        with (
            open(scratch / f"{split}{PROVISIONAL}", "rb") as source,
            open(directory / f"{split}.bin", "wb") as out,
        ):
            while block := source.read(4 * REMAP_BLOCK):
                ids = remap(np.frombuffer(block, dtype=np.uint32))
                out.write(ids.tobytes())
                written += len(ids)
        stats[split].tokens = written
    if plan.unit == "tokens":
        carve_token_tail(plan, directory, stats, np.dtype(dtype).itemsize)
    return stats
