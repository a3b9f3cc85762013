"""Scalar heads on a language model's hidden state: reward models and PPO's value head, for every family.

Any `LanguageModel` gives `hidden(ids) -> (B, T, C)`, the state its output layer reads; a `ScalarHead` maps
it to one number per position. `RewardModel` reads that number at the last token of each sequence (the
<eos> after the response), so an LSTM becomes a reward model exactly as a Transformer does: the
recurrent state there has read the whole prompt and response. Sequences are right-padded; padding after
the last token cannot change a causal model's state at it.

A reward model's score also adds a learned multiple of the response's log-likelihood under the model's
own output layer. A head read at one position judges style and form, but checking a sum or a reversal
from there is a computation it rarely learns from a few hundred pairs; the language model it starts from
already makes that computation when it predicts the response, and its log-likelihood carries the result.
"""

from __future__ import annotations

import torch
from torch import nn

from lmzoo.models.base import PAD_ID, LanguageModel


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
    """A language model with a scalar head read at each sequence's last token, plus (with `likelihood`) a
    learned weight times the response's log-likelihood: r(x, y) = w . h_last + b + a log p(y | x)."""

    kind = "reward"

    def __init__(self, lm: LanguageModel, likelihood: bool = True) -> None:
        super().__init__()
        self.lm = lm
        self.score = ScalarHead(hidden_width(lm))
        self.likelihood = likelihood
        # a starts at 1: a reward model starts as its language model's judgement of the response (plus the
        # head, which starts at zero) and learns from the pairs how much of it to keep; without it, a = 0
        self.likelihood_weight = nn.Parameter(torch.tensor(float(likelihood)), requires_grad=likelihood)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """ids (B, T) right-padded prompt + response + <eos>, lengths (B,), starts (B,) the prompt's
        length (where the response begins) -> rewards (B,); the head is read at position lengths - 1."""
        h, _ = self.lm.hidden(ids)  # (B, T, C)
        scores = self.score(h)  # (B, T)
        reward = scores.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1).float()  # (B,)
        if not self.likelihood:
            return reward
        return reward + self.likelihood_weight * self.response_logprobs(h, ids, lengths, starts)

    def response_logprobs(
        self, h: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor
    ) -> torch.Tensor:
        """log p(response + <eos> | prompt) of each row (B,): the tokens at positions [starts, lengths)."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        wanted = (positions >= starts[:, None]) & (positions < lengths[:, None])  # (B, T)
        targets = torch.where(wanted, ids, PAD_ID)[:, 1:]  # position t predicts token t + 1
        return self.lm.head.sequence_logprobs(h[:, :-1], targets, ignore_index=PAD_ID)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        # reward models saved before the likelihood term load as what they were: the head alone
        state_dict.setdefault(prefix + "likelihood_weight", torch.zeros(()))
        super()._load_from_state_dict(state_dict, prefix, *args)
