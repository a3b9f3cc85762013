"""Scalar heads on a language model's hidden state: reward models and PPO's value head, for every family.

Any `LanguageModel` gives `hidden(ids) -> (B, T, C)`, the state its output layer reads; a `ScalarHead` maps
it to one number per position. `RewardModel` reads that number at the last token of each sequence (the
<eos> after the response), so an LSTM becomes a reward model exactly as a Transformer does: the
recurrent state there has read the whole prompt and response. Sequences are right-padded; padding after
the last token cannot change a causal model's state at it.
"""

from __future__ import annotations

import torch
from torch import nn

from lmzoo.models.base import LanguageModel


class ScalarHead(nn.Module):
    """h (..., C) -> w . h + b (...): one number per position, starting at zero."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h).squeeze(-1)  # (...)


def hidden_width(lm: LanguageModel) -> int:
    """The width C of the hidden state the model's output layer reads."""
    return int(lm.head.in_features)


class RewardModel(nn.Module):
    """A language model with a scalar head read at each sequence's last token: r(prompt, response)."""

    kind = "reward"

    def __init__(self, lm: LanguageModel) -> None:
        super().__init__()
        self.lm = lm
        self.score = ScalarHead(hidden_width(lm))

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, T) right-padded, lengths (B,) -> rewards (B,) read at position lengths - 1."""
        h, _ = self.lm.hidden(ids)  # (B, T, C)
        scores = self.score(h)  # (B, T)
        return scores.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1).float()  # (B,)
