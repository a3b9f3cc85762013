"""A word vocabulary fitted while the corpus is encoded (lmzoo.data.one_pass): words are numbered per
job, a line end is number 0 (it becomes <eos>; line ends are not counted), and each number becomes one
token.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from pathlib import Path

import numpy as np

from lmzoo.config.schema import TokenizerConfig
from lmzoo.data.corpus import CorpusPlan
from lmzoo.data.encoders import id_dtype
from lmzoo.data.one_pass import (
    LINE_END,
    Numbered,
    Numbering,
    OnePass,
    Stats,
    Vocabulary,
    first_numbered,
    write_remapped,
)
from lmzoo.data.sample import Parts
from lmzoo.data.tokenizer import EOS, MARK, Tokenizer, WordTokenizer


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
    if mark_is_word:
        distinct, ids = _numbered_with_mark(pieces)
    else:
        distinct, ids = first_numbered([words for words, _, _ in pieces], (EOS, MARK))
    arrays, first = [], 0
    for cuts in parts:
        arrays.append(ids[first] if len(cuts) == 1 else np.concatenate(ids[first : first + len(cuts)]))
        first += len(cuts)
    fitted = [numbered for numbered, (_, _, counted) in zip(ids, pieces, strict=True) if counted]
    counts = np.bincount(np.concatenate(fitted), minlength=len(distinct) + 1) if fitted else np.zeros(1, int)
    counts[LINE_END] = 0
    return distinct, arrays, counts


def _numbered_with_mark(pieces: list[tuple[list[str], str, bool]]) -> tuple[list[str], list[np.ndarray]]:
    """`first_numbered` for texts some of which hold MARK as a word: there only <eos> is a line end."""
    line_ends = {EOS}
    chained = itertools.chain.from_iterable(words for words, _, _ in pieces)
    distinct = [w for w in dict.fromkeys(chained) if w not in line_ends]
    numbers = dict(zip(distinct, range(1, len(distinct) + 1), strict=True))
    numbers.update(dict.fromkeys(line_ends, LINE_END))
    marked = {**numbers, MARK: LINE_END}
    ids = [
        np.fromiter(map((marked if end == MARK else numbers).__getitem__, words), np.uint32, len(words))
        for words, end, _ in pieces
    ]
    return distinct, ids


def _looked_up(splitter: WordTokenizer, text: str) -> tuple[list[str], str]:
    """The words `WordTokenizer.encode` looks up, in order, and the word that stands for a line end in
    them: MARK, or <eos> where the text or the filters hold MARK (then MARK may be a word like any other)."""
    marked = splitter.marked_words(text)
    return (splitter.words(text), EOS) if marked is None else (marked, MARK)


def word_numbering(config: TokenizerConfig) -> Numbering:
    return functools.partial(number_words, WordTokenizer.splitter(config))


def fit_words(vocabulary: Vocabulary, config: TokenizerConfig) -> WordTokenizer:
    return WordTokenizer.from_counts(Counter(vocabulary.counted()), config)


def write_token_files(
    scratch: Path,
    directory: Path,
    tokenizer: Tokenizer,
    vocabulary: Vocabulary,
    stats: Stats,
    plan: CorpusPlan,
) -> Stats:
    """The provisional files of `scratch` as token files in `directory` (then carved, for a token tail):
    each number is one token."""
    assert isinstance(tokenizer, WordTokenizer)
    stoi, unk = tokenizer.stoi, tokenizer.unk_id
    dtype = id_dtype(tokenizer.vocab_size)
    table = np.fromiter((stoi.get(w, unk) for w in vocabulary.words), dtype, len(vocabulary.words))
    table[LINE_END] = tokenizer.eos_id
    return write_remapped(scratch, directory, stats, plan, lambda numbers: np.take(table, numbers), dtype)


WORD_PASS = OnePass(numbering=word_numbering, fit=fit_words, write=write_token_files, whole_lines=True)
