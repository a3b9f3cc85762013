"""Batch -> loss. The training loop calls an objective and does not know which family it trains.

Every objective is called as `objective(forward, batch) -> (loss, tokens)` where `forward` is the
model (or its compiled/distributed wrapper) and `tokens` counts the target tokens of the batch.
Objectives that keep state between batches (the carried recurrent state of truncated BPTT) expose
it through `state_dict()` so that a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from lmzoo.data.batch import LMBatch, PairBatch, PreferenceBatch, RewardPairBatch
from lmzoo.inference.preferences import preference_metrics
from lmzoo.models.base import PAD_ID, detach_state

__all__ = ["DPOObjective", "LMObjective", "RewardObjective", "Seq2SeqObjective", "preference_metrics"]


class LMObjective:
    """Next-token cross-entropy; with `carry`, the recurrent state flows from one batch to the next.

    Label smoothing applies to training only: evaluation always reports the plain likelihood.
    """

    def __init__(self, *, carry: bool, label_smoothing: float = 0.0) -> None:
        self.carry = carry
        self.label_smoothing = label_smoothing
        self.state: Any = None

    def __call__(self, forward: Any, batch: LMBatch) -> tuple[torch.Tensor, int]:
        state_in = None if (batch.starts_epoch or not self.carry) else self.state
        loss, state_out = forward(
            batch.inputs, state_in, targets=batch.targets, label_smoothing=self.label_smoothing
        )
        if self.carry:
            self.state = detach_state(state_out)
        return loss, batch.targets.numel()

    def state_dict(self) -> dict[str, Any]:
        return {"carried": self.state if self.carry else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state.get("carried")


class Seq2SeqObjective:
    """Teacher-forced cross-entropy of the target given the source (padding ignored; label smoothing
    in training only)."""

    def __init__(self, *, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def __call__(self, forward: Any, batch: PairBatch) -> tuple[torch.Tensor, int]:
        loss, _ = forward(
            batch.source, batch.target_in, targets=batch.target_out, label_smoothing=self.label_smoothing
        )
        tokens = batch.tokens if batch.tokens is not None else int((batch.target_out != PAD_ID).sum())
        return loss, tokens

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def sequence_logprobs(forward: Any, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log pi(response | prompt) per row (B,): the sum of token log-probabilities where targets != PAD, the
    model's output layer run on those positions only (LanguageModel.forward's `per_sequence`)."""
    logprobs, _ = forward(inputs, targets=targets, per_sequence=True)
    return logprobs.float()


class DPOObjective:
    """Direct Preference Optimisation (Rafailov et al., 2023):

        loss = -log sigmoid(beta * [(log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))])

    over response tokens only. `reference` scores the frozen reference model: with LoRA or adapters
    it is the same model with them switched off, otherwise a frozen copy. `nll` > 0 adds that weight
    times the chosen responses' negative log-likelihood per token (RPO, Pang et al., 2024): DPO alone
    may lower both responses' likelihood as long as the rejected one falls faster, which can unlearn
    what the reference wrote well. `metrics` holds the last batch's reward accuracy (ties count half),
    margin, and chosen/rejected rewards.
    """

    def __init__(self, beta: float, reference: Any, nll: float = 0.0) -> None:
        self.beta, self.nll = beta, nll
        self.reference = reference  # callable(inputs, targets) -> reference log-probs (B,)
        self.metrics: dict[str, float] = {}
        self.last_rewards: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, forward: Any, batch: PreferenceBatch) -> tuple[torch.Tensor, int]:
        inputs = torch.cat([batch.chosen_inputs, batch.rejected_inputs])
        targets = torch.cat([batch.chosen_targets, batch.rejected_targets])
        policy = sequence_logprobs(forward, inputs, targets)
        with torch.no_grad():
            reference = self.reference(inputs, targets)
        rewards = self.beta * (policy - reference)
        chosen, rejected = rewards.chunk(2)
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        if self.nll:
            chosen_tokens = (batch.chosen_targets != PAD_ID).sum().clamp(min=1)
            loss = loss - self.nll * policy[: len(chosen)].sum() / chosen_tokens
        self.last_rewards = (chosen.detach().float(), rejected.detach().float())
        self.metrics = preference_metrics(*self.last_rewards)
        return loss, int((targets != PAD_ID).sum())

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class RewardObjective:
    """A reward model's Bradley-Terry loss (Bradley & Terry, 1952; Ouyang et al., 2022):

        loss = -log sigmoid(r(x, y_c) - r(x, y_r))

    the negative log-likelihood that the chosen response beats the rejected one when P(c > r) is the
    sigmoid of their reward difference. `metrics` holds the last batch's accuracy and margins.
    """

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def __call__(self, forward: Any, batch: RewardPairBatch) -> tuple[torch.Tensor, int]:
        ids = torch.cat([batch.chosen, batch.rejected])  # (2B, T)
        lengths = torch.cat([batch.chosen_lengths, batch.rejected_lengths])  # (2B,)
        starts = batch.prompt_lengths.repeat(2)  # (2B,) where each response begins
        chosen, rejected = forward(ids, lengths, starts).float().chunk(2)  # (B,), (B,)
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        self.metrics = preference_metrics(chosen.detach(), rejected.detach())
        return loss, int(lengths.sum())

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
