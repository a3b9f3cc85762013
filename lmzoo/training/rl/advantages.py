"""Advantages: GAE for PPO and group-normalised scores for GRPO, over the response tokens of a rollout.

Rollouts are (B, T) rows of prompt + response; `mask` (B, T) is True at the response's tokens (the
actions), which are contiguous and end each row's actions.
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is True (0 when nothing is)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / std over the masked entries; 0 elsewhere."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + eps) * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over each row's actions.

        delta_t = r_t + gamma * V_{t+1} - V_t        (V after the last action is 0)
        A_t     = delta_t + gamma * lam * A_{t+1}

    rewards, values, mask (B, T) -> (advantages, returns = advantages + values), both 0 off the mask.
    """
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in range(values.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = advantage
        # positions off the mask (the prompt, padding) pass nothing back
        next_value = torch.where(mask[:, t] > 0, values[:, t], torch.zeros_like(next_value))
        next_advantage = advantage
    return advantages, (advantages + values) * mask


def group_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al., 2024): each response's score against the others sampled for its prompt,
    (s - mean of the group) / (std of the group + eps), population std. scores (B,), groups consecutive."""
    groups = scores.float().view(-1, group_size)  # (prompts, G)
    mean = groups.mean(-1, keepdim=True)
    std = groups.std(-1, unbiased=False, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1)
