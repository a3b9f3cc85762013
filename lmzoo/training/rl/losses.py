"""The RL losses, token by token over a rollout's actions, and the KL controller of PPO's reward.

    ratio_t   = exp(log pi(a_t) - log pi_old(a_t))
    policy    = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))     (Schulman et al., 2017)
    value     = 0.5 * mean_t max((V_t - R_t)^2, (V_old + clip(V_t - V_old, -c, c) - R_t)^2)
    PPO reward: r_t = -beta * (log pi_old(a_t) - log pi_ref(a_t)), plus the score at the last action
    GRPO KL:   k3_t = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1 >= 0   (Schulman's estimator)

Means are over the masked (action) positions of the minibatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmzoo.training.rl.advantages import masked_mean


@dataclass
class PolicyLoss:
    loss: torch.Tensor
    clip_fraction: torch.Tensor  # share of actions whose ratio was clipped
    approx_kl: torch.Tensor  # 0.5 * mean (log ratio)^2: how far this update moved from the rollout policy


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> PolicyLoss:
    """PPO's clipped surrogate objective (as a loss to minimise) over the masked actions."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        fraction = masked_mean(((ratio - 1.0).abs() > clip).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return PolicyLoss(loss, fraction, approx_kl)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> torch.Tensor:
    """PPO's value loss: the worse of the plain and the clipped squared error, halved."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def kl_penalised_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-token rewards (B, T): -beta * (log pi - log pi_ref) at every action, plus the score (B,) at
    each row's last action."""
    rewards = -beta * (logprobs - ref_logprobs) * mask
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).max(dim=1).values  # (B,) index of the last action
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """exp(q - p) - (q - p) - 1 per token (p, q: policy and reference log-probabilities): an unbiased,
    never negative estimate of KL(pi || pi_ref) on tokens sampled from pi."""
    diff = ref_logprobs - logprobs
    return diff.exp() - diff - 1.0


class KLController:
    """PPO's beta: fixed, or adaptive (Ziegler et al., 2019): after each rollout with mean KL per response
    `kl`, beta *= 1 + clip(kl / target - 1, -0.2, 0.2) * responses / horizon."""

    def __init__(self, beta: float, target: float | None = None, horizon: int = 10000) -> None:
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, responses: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * responses / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = float(state["beta"])
