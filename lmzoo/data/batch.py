"""The batch types every batch source yields and every objective reads, and moving them to a device."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


def to_device(batch: Any, device: torch.device) -> Any:
    """The same batch (a NamedTuple or a plain tuple) with every tensor moved to `device`."""
    moved = [v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for v in batch]
    return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)


class LMBatch(NamedTuple):
    inputs: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T), inputs shifted by one
    starts_epoch: bool = True  # a carried state must be reset before this batch


class PairBatch(NamedTuple):
    source: torch.Tensor  # (B, S), padded with PAD_ID
    target_in: torch.Tensor  # (B, T): <bos> y_1 .. y_n, padded
    target_out: torch.Tensor  # (B, T): y_1 .. y_n <eos>, padded
    tokens: int | None = None  # target tokens, when counted ahead (token-count batches): no device read


class PreferenceBatch(NamedTuple):
    chosen_inputs: torch.Tensor  # (B, T): prompt + chosen response
    chosen_targets: torch.Tensor  # (B, T): PAD except on the response tokens
    rejected_inputs: torch.Tensor
    rejected_targets: torch.Tensor


class RewardPairBatch(NamedTuple):
    """Preference pairs as a reward model reads them: prompt + response + <eos>, right-padded."""

    chosen: torch.Tensor  # (B, T)
    chosen_lengths: torch.Tensor  # (B,) tokens before the padding
    rejected: torch.Tensor  # (B, T)
    rejected_lengths: torch.Tensor  # (B,)
    prompt_lengths: torch.Tensor  # (B,) where each response begins (the pair's prompt is shared)
