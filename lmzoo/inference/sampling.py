"""Choosing the next token from a model's scores: greedy, temperature, top-k, top-p, repetition penalty.

Every function works on rows (B, V), so one sequence and a batch of sequences go through the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingOptions:
    """How one sequence is sampled; `Run.sampling` builds these from a run's `sample:` section."""

    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    greedy: bool = False  # temperature 0 means greedy too
    stop: Sequence[str] = field(default_factory=tuple)
    ignore_eos: bool = False  # <eos> does not end the text (fixed-length benchmarks; seq2seq: up to max_len)

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty: scores of tokens already in the text are divided (if > 0) or multiplied by it."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest scores in each row; the rest become -inf."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability mass reaches p."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(-1)
    drop_sorted = probs.cumsum(-1) - probs >= p  # mass before this token already reaches p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(
    logits: torch.Tensor, options: SamplingOptions, *, seen: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Pick the next id for each row of logits (B, V); `seen` (B, V) marks tokens already in the text."""
    logits = apply_repetition_penalty(logits, seen, options.repetition_penalty)
    if options.is_greedy:
        return logits.argmax(-1)
    logits = logits / options.temperature
    if options.top_k is not None:
        logits = filter_top_k(logits, options.top_k)
    if options.top_p is not None and options.top_p < 1.0:
        logits = filter_top_p(logits, options.top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
