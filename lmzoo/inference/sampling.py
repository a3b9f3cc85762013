"""Choosing the next token from a model's scores: greedy, temperature, top-k, top-p, repetition penalty.

Every function works on rows (B, V), each row with its own options and random stream, so one sequence
and a batch of sequences (the decoding engine's) go through the same code and choose the same tokens.
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


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor
) -> torch.Tensor:
    """CTRL-style penalty: scores of tokens already in the text are divided (if > 0) or multiplied by it
    (a float, or (B, 1) per row)."""
    if isinstance(penalty, float) and penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Keep the k highest scores in each row (k an int, or (B,) per row); the rest become -inf."""
    if isinstance(k, int):
        k = min(k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    else:
        ranked = logits.sort(dim=-1, descending=True).values
        kth = ranked.gather(-1, (k.clamp(max=logits.shape[-1]) - 1)[:, None])  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability mass reaches p (a float, or
    (B, 1) per row; inf keeps every token)."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(-1)
    drop_sorted = probs.cumsum(-1) - probs >= p  # mass before this token already reaches p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_rows(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One id per row of probs (B, V), each drawn with its row's generator (None: torch's global one):
    the first id whose cumulative probability passes a uniform draw, so a row's choice depends only on
    its own scores and its own random stream, alone or in a batch."""
    draws = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generators])  # (B,)
    cumulative = probs.cumsum(-1)  # (B, V)
    target = draws[:, None] * cumulative[:, -1:]  # (B, 1)
    return torch.searchsorted(cumulative, target, right=True).clamp(max=probs.shape[-1] - 1)[:, 0]


def choose_tokens(
    logits: torch.Tensor,
    options: Sequence[SamplingOptions],
    *,
    seen: torch.Tensor | None,
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """The next id of each row of logits (B, V), each row with its own options and generator; `seen`
    (B, V) marks tokens already in each row's text (needed only for a repetition penalty)."""
    penalties = [o.repetition_penalty for o in options]
    if seen is not None and any(p != 1.0 for p in penalties):
        logits = apply_repetition_penalty(
            logits, seen, torch.tensor(penalties, device=logits.device)[:, None]
        )
    chosen = logits.argmax(-1)
    rows = [row for row, o in enumerate(options) if not o.is_greedy]
    if not rows:
        return chosen
    picked = [options[row] for row in rows]
    device = logits.device
    scores = logits[rows] / torch.tensor([o.temperature for o in picked], device=device)[:, None]
    if any(o.top_k is not None for o in picked):
        ks = [o.top_k if o.top_k is not None else scores.shape[-1] for o in picked]
        scores = filter_top_k(scores, torch.tensor(ks, device=device))
    if any(o.top_p is not None and o.top_p < 1.0 for o in picked):
        ps = [o.top_p if o.top_p is not None and o.top_p < 1.0 else float("inf") for o in picked]
        scores = filter_top_p(scores, torch.tensor(ps, device=device)[:, None])
    chosen[rows] = sample_rows(scores.softmax(-1), [generators[row] for row in rows])
    return chosen


def next_token(
    logits: torch.Tensor, options: SamplingOptions, *, seen: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Pick the next id for each row of logits (B, V), all rows under `options` and `generator`; `seen`
    (B, V) marks tokens already in the text."""
    return choose_tokens(logits, [options] * len(logits), seen=seen, generators=[generator] * len(logits))
