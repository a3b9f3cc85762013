"""The fit sample: which text a word or BPE tokenizer is fitted on.

At most `tokenizer.fit_bytes` characters of the fitted splits: all of them when they are smaller, else
every k-th block of about SAMPLE_BLOCK characters (ending at a line end), evenly spread, until
`fit_bytes` characters are taken; then the document separator's text.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from lmzoo.config.schema import TokenizerConfig
from lmzoo.data.corpus import SPLITS
from lmzoo.data.scan import Scanned
from lmzoo.data.token_files import Jobs, Tag
from lmzoo.data.tokenizer import EOS

SAMPLE_BLOCK = 1 << 16  # the fit sample is made of blocks of about this many characters
Parts = list[tuple[int, int, bool]]  # a text cut in parts: (start, end, whether the fit counts it)


def fitted_splits(config: TokenizerConfig) -> set[str]:
    return {"train"} if config.fit_on == "train" else set(SPLITS)


def separator_text(corpus: Scanned) -> str:
    """The text between two documents ("" for <eos>, which is not text)."""
    document_end = corpus.plan.data.document_end
    return "" if document_end == EOS else document_end


def sample_blocks(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of the blocks the fit sample is drawn from: about SAMPLE_BLOCK characters, ending at a
    line end."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + SAMPLE_BLOCK)
        end = len(text) if end == -1 else end + 1
        yield start, end
        start = end


def _fit_bytes_estimate(corpus: Scanned, wanted: set[str]) -> float:
    sizes = {role: sum(s.size for s in found) for role, found in corpus.sources().items()}
    total, split = sum(corpus.counts.values()), corpus.plan.data.split
    share = corpus.counts.get("train", 0) / total if total else split[0] / sum(split)
    train_role = sizes["train"] * (1.0 if wanted == set(SPLITS) else share)
    return train_role + sum(size for role, size in sizes.items() if role != "train" and role in wanted)


def sample_stride(corpus: Scanned, config: TokenizerConfig) -> int:
    """The fit sample takes every k-th block of the fitted splits' text: this k (1: all of it)."""
    return max(1, math.ceil(_fit_bytes_estimate(corpus, fitted_splits(config)) / config.fit_bytes))


class FitSample:
    """Which parts of which texts the fit counts, as the fit sample takes them: the fitted splits' text,
    every k-th block of it when it is larger than `fit_bytes`, until `fit_bytes` characters are taken."""

    def __init__(self, corpus: Scanned, config: TokenizerConfig) -> None:
        self.splits, self.limit = fitted_splits(config), config.fit_bytes
        self.stride = sample_stride(corpus, config)
        self.size = self.index = 0  # characters taken; blocks passed
        self.text = False  # whether any taken text is not whitespace
        self.cut_line = False  # whether a taken text was cut inside a line (a line of more than 16 MB)

    @property
    def full(self) -> bool:
        """Whether the sample has taken `fit_bytes` characters (no later text is counted)."""
        return self.size >= self.limit

    def flag(self, jobs: Jobs) -> Iterator[tuple[list[Tag], tuple[list[str], list[Parts]]]]:
        for tags, texts in jobs:
            parts = [
                self._parts(split, ends, text) for (split, ends, _), text in zip(tags, texts, strict=True)
            ]
            yield tags, (texts, parts)

    def _parts(self, split: str, ends: bool, text: str) -> Parts:
        if split not in self.splits or self.full:
            return [(0, len(text), False)]
        self.cut_line = self.cut_line or (not ends and not text[-1:].isspace())
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
