"""Batch -> loss. The training loop calls an objective and does not know which family it trains.

Every objective is called as `objective(forward, batch) -> (loss, tokens)` where `forward` is the
model (or its compiled/distributed wrapper) and `tokens` counts the target tokens of the batch.
Objectives that keep state between batches (the carried recurrent state of truncated BPTT) expose
it through `state_dict()` so that a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from lmzoo.models.base import PAD_ID, detach_state


def to_device(batch: Any, device: torch.device) -> Any:
    """The same batch (a NamedTuple) with every tensor moved to `device`."""
    return type(batch)(*(v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for v in batch))


class LMBatch(NamedTuple):
    inputs: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T), inputs shifted by one
    starts_epoch: bool = True  # a carried state must be reset before this batch


class PairBatch(NamedTuple):
    source: torch.Tensor  # (B, S), padded with PAD_ID
    target_in: torch.Tensor  # (B, T): <bos> y_1 .. y_n, padded
    target_out: torch.Tensor  # (B, T): y_1 .. y_n <eos>, padded


class LMObjective:
    """Next-token cross-entropy; with `carry`, the recurrent state flows from one batch to the next."""

    def __init__(self, *, carry: bool) -> None:
        self.carry = carry
        self.state: Any = None

    def __call__(self, forward: Any, batch: LMBatch) -> tuple[torch.Tensor, int]:
        state_in = None if (batch.starts_epoch or not self.carry) else self.state
        loss, state_out = forward(batch.inputs, state_in, targets=batch.targets)
        if self.carry:
            self.state = detach_state(state_out)
        return loss, batch.targets.numel()

    def state_dict(self) -> dict[str, Any]:
        return {"carried": self.state if self.carry else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state.get("carried")


class Seq2SeqObjective:
    """Teacher-forced cross-entropy of the target given the source (padding ignored)."""

    def __call__(self, forward: Any, batch: PairBatch) -> tuple[torch.Tensor, int]:
        loss, _ = forward(batch.source, batch.target_in, targets=batch.target_out)
        return loss, int((batch.target_out != PAD_ID).sum())

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
