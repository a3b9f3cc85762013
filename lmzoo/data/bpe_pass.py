"""A byte-level BPE vocabulary fitted on a corpus, and while the corpus is encoded (lmzoo.data.one_pass).

BPE is fitted on pre-token counts (lmzoo.data.bpe_trainer): the pre-tokens of each part of the fit sample
(a fitted piece of text, or a block of it), each part split on its own, and of the document separator
once. In one pass the units are the pre-tokens, numbered from 1 (number 0 is <eos> between documents);
a counted block whose ends are pre-token ends of its text (a line end between two characters that are
not whitespace) is counted from the text's own pre-tokens, other blocks are split again. Each number
then becomes the ids of its pre-token.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lmzoo.config.schema import TokenizerConfig
from lmzoo.data.bpe_trainer import count_pretokens
from lmzoo.data.corpus import CorpusPlan
from lmzoo.data.encoders import id_dtype, in_workers, spans
from lmzoo.data.one_pass import (
    LINE_END,
    NotInOnePass,
    Numbered,
    Numbering,
    OnePass,
    Stats,
    Vocabulary,
    first_numbered,
    write_remapped,
)
from lmzoo.data.pretokens import pretokens
from lmzoo.data.sample import FitSample, Parts, separator_text
from lmzoo.data.scan import Scanned
from lmzoo.data.token_files import piece_jobs
from lmzoo.data.tokenizer import BpeTokenizer, Tokenizer
from lmzoo.errors import DataError

ENCODE_BATCH = 1 << 16  # distinct pre-tokens encoded by the library at a time


def bpe_counts(corpus: Scanned, config: TokenizerConfig, workers: int) -> Counter[str]:
    """The pre-token counts a BPE tokenizer of `config` is fitted on, counted by `workers` processes."""
    sample = FitSample(corpus, config)

    def jobs() -> Iterator[tuple[None, list[str]]]:
        for _, (texts, parts) in sample.flag(piece_jobs(corpus.route(), stop=lambda: sample.full)):
            yield (
                None,
                [text[a:b] for text, cuts in zip(texts, parts, strict=True) for a, b, taken in cuts if taken],
            )

    results = (
        in_workers(count_pretokens, jobs(), workers, _start_counter, ())
        if workers > 1
        else ((tag, count_pretokens(texts)) for tag, texts in jobs())
    )
    counts: Counter[str] = Counter()
    for _, found in results:
        counts.update(found)
    separator = separator_text(corpus)
    if not sample.text and not separator.strip():
        raise DataError("cannot fit a tokenizer on empty text")
    return count_pretokens([separator], counts)


def _start_counter() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker


def number_pretokens(texts: list[str], parts: list[Parts]) -> Numbered:
    """Each text's pre-tokens as numbers (1 + the pre-token's place among the distinct ones), with how often
    each number occurs in the counted parts (each part split on its own)."""
    found = [_pretokens(text) for text in texts]
    cut = [  # counted parts that do not end where pre-tokens of their text end
        pretokens(text[a:b]) or []
        for text, cuts in zip(texts, parts, strict=True)
        if len(cuts) > 1
        for a, b, counted in cuts
        if counted and not (_kept(text, a) and _kept(text, b))
    ]
    distinct, numbered = first_numbered(found + cut)
    arrays, counted, split_again = numbered[: len(found)], [], iter(numbered[len(found) :])
    for text, tokens, ids, cuts in zip(texts, found, arrays, parts, strict=True):
        if len(cuts) == 1:
            counted += [ids] if cuts[0][2] else []
            continue
        lengths = np.fromiter(map(len, tokens), np.int64, len(tokens))
        starts = np.cumsum(lengths) - lengths
        for a, b, taken in cuts:
            if taken and _kept(text, a) and _kept(text, b):
                counted.append(ids[np.searchsorted(starts, a) : np.searchsorted(starts, b)])
            elif taken:
                counted.append(next(split_again))
    counts = (
        np.bincount(np.concatenate(counted), minlength=len(distinct) + 1) if counted else np.zeros(1, int)
    )
    return distinct, arrays, counts


def _pretokens(text: str) -> list[str]:
    found = pretokens(text)
    if found is None:  # characters only the library places: fitted first, encoded after
        raise NotInOnePass
    return found


def _kept(text: str, position: int) -> bool:
    """Whether `text` split at `position` gives the pre-tokens of the whole on each side: at either end,
    or right after a line end with no whitespace on either side."""
    if position in (0, len(text)):
        return True
    return (
        text[position - 1] == "\n"
        and (position == 1 or not text[position - 2].isspace())
        and not text[position].isspace()
    )


def bpe_numbering(config: TokenizerConfig) -> Numbering:
    return number_pretokens


def fit_bpe(vocabulary: Vocabulary, config: TokenizerConfig) -> BpeTokenizer:
    return BpeTokenizer.from_counts(Counter(vocabulary.counted()), config)


def write_token_files(
    scratch: Path,
    directory: Path,
    tokenizer: Tokenizer,
    vocabulary: Vocabulary,
    stats: Stats,
    plan: CorpusPlan,
) -> Stats:
    """The provisional files of `scratch` as token files in `directory` (then carved, for a token tail):
    each number becomes the ids of its pre-token."""
    assert isinstance(tokenizer, BpeTokenizer)
    dtype = id_dtype(tokenizer.vocab_size)
    assert LINE_END == 0
    lengths, ids = [np.ones(1, dtype=np.int32)], [np.asarray([tokenizer.eos_id], dtype=dtype)]
    for start in range(1, len(vocabulary.words), ENCODE_BATCH):  # in batches: memory stays small
        batch = vocabulary.words[start : start + ENCODE_BATCH]
        encoded = [e.ids for e in tokenizer.backend.encode_batch_fast(batch, add_special_tokens=False)]
        lengths.append(np.fromiter(map(len, encoded), np.int32, len(encoded)))
        ids.append(np.fromiter(itertools.chain.from_iterable(encoded), dtype, int(lengths[-1].sum())))
    # int32 spans (the distinct pre-tokens' ids are far fewer than 2**31) index faster than int64.
    counts, flat = np.concatenate(lengths), np.concatenate(ids)
    starts = np.cumsum(counts) - counts
    return write_remapped(
        scratch, directory, stats, plan, lambda numbers: spans(flat, starts, counts, numbers), dtype
    )


BPE_PASS = OnePass(numbering=bpe_numbering, fit=fit_bpe, write=write_token_files, whole_lines=False)
