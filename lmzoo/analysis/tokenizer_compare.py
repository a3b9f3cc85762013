"""Tokenizers side by side: char, word and BPE at a few vocabulary sizes, fitted on one training split
and measured on its validation split (lmzoo tokenize --compare).

Each tokenizer is fitted as `lmzoo prepare` fits it (on the same bounded sample of the training split,
kept in the corpus cache) and measured on the first VALIDATION_CHARS characters of the validation split,
read from the sources in chunks: a corpus of any size is compared in bounded time and memory.

Per tokenizer: vocabulary size, characters per token (validation characters / validation tokens:
how much text one prediction covers), the share of validation tokens that are <unk>, encoding speed
(characters per second, one pass over the validation text), fitting time, and the tokens of one
sample line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from lmzoo.config.errors import describe
from lmzoo.config.schema import DataConfig, TokenizerConfig
from lmzoo.data.tokenizer import TOKENIZER_REGISTRY, Tokenizer
from lmzoo.errors import ConfigError, DataError

DEFAULT_BPE_SIZES = (512, 1024, 2048)
VALIDATION_CHARS = 10_000_000


@dataclass
class TokenizerRow:
    name: str
    vocab_size: int
    chars_per_token: float
    unknown_share: float  # of validation tokens
    chars_per_second: float
    fit_seconds: float
    sample: list[str]  # the sample line's tokens


def standard_tokenizers(bpe_sizes: tuple[int, ...] = DEFAULT_BPE_SIZES) -> list[tuple[str, TokenizerConfig]]:
    """(name, config) of char, word (the word tokenizer's defaults) and BPE at each size."""
    make: dict[str, Any] = {
        kind: entry.config for kind, entry in TOKENIZER_REGISTRY.items()
    }  # config classes
    found = [("char", make["char"]()), ("word", make["word"]())]
    for size in bpe_sizes:
        try:
            found.append((f"bpe {size}", make["bpe"](vocab_size=size)))
        except ValidationError as err:
            raise ConfigError(f"bpe_size {size}: {describe(err, make['bpe'])}", param="bpe_size") from None
    return found


def sample_line(text: str, min_chars: int = 24) -> str:
    """The first line of `text` with at least `min_chars` characters (else its longest line)."""
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        raise DataError("the validation split has no text")
    return next((line for line in lines if len(line) >= min_chars), max(lines, key=len))


def measure(name: str, tokenizer: Tokenizer, val: str, sample: str, fit_seconds: float) -> TokenizerRow:
    """The row of one fitted tokenizer on the validation text."""
    from lmzoo.analysis.attention import token_label
    from lmzoo.inference.scoring import token_text

    start = time.perf_counter()
    ids = tokenizer.encode(val)
    seconds = max(time.perf_counter() - start, 1e-9)
    unknown = sum(1 for i in ids if i == tokenizer.unk_id)
    return TokenizerRow(
        name=name,
        vocab_size=tokenizer.vocab_size,
        chars_per_token=len(val) / max(1, len(ids)),
        unknown_share=unknown / max(1, len(ids)),
        chars_per_second=len(val) / seconds,
        fit_seconds=fit_seconds,
        sample=[token_label(token_text(tokenizer, i)) for i in tokenizer.encode(sample)],
    )


def compare_tokenizers(
    data: DataConfig,
    tokenizers: list[tuple[str, TokenizerConfig]],
    *,
    sample: str | None = None,
    progress: bool = False,
) -> tuple[list[TokenizerRow], str]:
    """Fit each tokenizer on the training split of `data` and measure it on the validation split."""
    from tqdm import tqdm

    from lmzoo.data.prepare import fit_on_corpus, split_text

    val = split_text(data, "val", VALIDATION_CHARS)
    line = sample if sample is not None else sample_line(val)
    rows = []
    bar = tqdm(tokenizers, desc="fitting tokenizers", unit="tokenizer", disable=not progress, leave=False)
    for name, config in bar:
        bar.set_postfix_str(name)
        start = time.perf_counter()
        tokenizer = fit_on_corpus(data, config)
        rows.append(measure(name, tokenizer, val, line, time.perf_counter() - start))
    return rows, line
