"""The RL objective: a rollout minibatch -> the PPO or GRPO loss, and what it measured for the log.

PPO: clipped policy loss + value_coef * clipped value loss (the value head reads the policy's hidden state)
- entropy_coef * entropy. GRPO: clipped policy loss with group advantages + beta * k3 KL to the reference
- entropy_coef * entropy. The policy is read through `hidden` and its output head directly (the value head
needs the hidden state), so RL trains uncompiled and in one process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmzoo.config.schema import RLConfig
from lmzoo.models.base import PAD_ID, LanguageModel
from lmzoo.training.rl.advantages import masked_mean
from lmzoo.training.rl.losses import clipped_policy_loss, clipped_value_loss, k3_kl
from lmzoo.training.rl.rollout import RolloutBatch, token_logprobs


class RLObjective:
    """`(forward, batch) -> (loss, response tokens)`; `metrics` holds the last minibatch's losses, clip
    fraction and approximate KL, and its rollout's reward, KL, entropy and response length."""

    def __init__(
        self, model: LanguageModel, rl: RLConfig, algorithm: str, value_head: nn.Module | None = None
    ) -> None:
        self.model, self.rl, self.algorithm, self.value_head = model, rl, algorithm, value_head
        self.metrics: dict[str, float] = {}

    def __call__(self, forward: Any, batch: RolloutBatch) -> tuple[torch.Tensor, int]:
        mask = batch.targets != PAD_ID
        h, _ = self.model.hidden(batch.inputs)  # (B, T, C)
        logprobs, entropy = token_logprobs(self.model.head.logits(h), batch.targets)  # (B, T)
        policy = clipped_policy_loss(logprobs, batch.old_logprobs, batch.advantages, mask, self.rl.clip)
        mean_entropy = masked_mean(entropy, mask)
        loss = policy.loss - self.rl.entropy_coef * mean_entropy
        metrics = {
            "policy_loss": policy.loss,
            "clip_fraction": policy.clip_fraction,
            "approx_kl": policy.approx_kl,
        }
        if self.value_head is not None:
            values = self.value_head(h).float()  # (B, T)
            value_loss = clipped_value_loss(values, batch.values, batch.returns, mask, self.rl.value_clip)
            loss = loss + self.rl.value_coef * value_loss
            metrics["value_loss"] = value_loss
        if self.algorithm == "grpo":
            kl = masked_mean(k3_kl(logprobs, batch.ref_logprobs), mask)
            loss = loss + self.rl.kl_coef * kl
            metrics["kl_loss"] = kl
        self.metrics = {**{k: float(v.detach()) for k, v in metrics.items()}, **batch.stats}
        return loss, int(mask.sum())

    def state_dict(self) -> dict[str, Any]:
        """PPO's value head (trained beside the policy, not part of its weights) for an exact resume."""
        return {"value_head": self.value_head.state_dict() if self.value_head is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.value_head is not None:
            self.value_head.load_state_dict(state["value_head"])
