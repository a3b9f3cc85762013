"""The frozen reference model of preference tuning and RL: the policy as it was when the run started.

With LoRA or adapters it is the same network with them switched off (no second copy of the weights);
otherwise a frozen deep copy. Called like a language model: reference(ids) -> (logits, state).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lmzoo.models.base import eval_mode
from lmzoo.models.peft import adapters_disabled, has_adapters


class AdaptersOff(nn.Module):
    """A fine-tuned model run with its LoRA/adapters switched off and dropout off: its base model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, ids: torch.Tensor, state: Any = None, **options: Any) -> Any:
        """The base model's forward (options such as DPO's `targets` pass through)."""
        with adapters_disabled(self.inner), eval_mode(self.inner):
            return self.inner(ids, state, **options)


def frozen_reference(model: nn.Module) -> nn.Module:
    """The reference for `model` as it is now (call before training changes it)."""
    if has_adapters(model):
        return AdaptersOff(model)
    return copy.deepcopy(model).eval().requires_grad_(False)
