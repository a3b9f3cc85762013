"""Rollouts: the batch source of RL. It samples responses from the current policy, scores them, and serves
the result as minibatches for `rl.epochs` passes before sampling again.

Each rollout draws `rl.prompts_per_rollout` training prompts (a seeded order that changes every epoch),
samples `rl.samples_per_prompt` responses to each with `complete` (from the source's own generator), and
in one forward pass without gradients reads the policy's log-probabilities, entropies and values, and the
reference's log-probabilities, of every response token. Then, by algorithm:

- PPO: per-token rewards are the KL penalty -beta * (log pi - log pi_ref) with the reward at the last token;
  advantages by GAE over the value head's estimates, whitened over the rollout; beta follows the KL controller.
- GRPO: every token of a response gets its group-normalised score as advantage; no value head.

Everything a resumed run needs is in `state_dict`: the prompt order, the generator, the KL controller,
and the rollout being served with the minibatch plan and position, so a run stopped mid-rollout
continues exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from lmzoo.config.schema import RLConfig
from lmzoo.data.examples import ShuffledBatches
from lmzoo.data.tokenizer import Tokenizer
from lmzoo.device import autocast
from lmzoo.inference.complete import complete
from lmzoo.inference.instructions import teacher_forced
from lmzoo.inference.loaded import LoadedModel
from lmzoo.inference.sampling import SamplingOptions
from lmzoo.models.base import PAD_ID, LanguageModel, eval_mode
from lmzoo.training.rl.advantages import gae, group_advantages, masked_mean, whiten
from lmzoo.training.rl.losses import KLController, kl_penalised_rewards
from lmzoo.training.rl.rewards import Reward

FIELDS = ("inputs", "targets", "old_logprobs", "ref_logprobs", "advantages", "returns", "values")


class RolloutBatch(NamedTuple):
    """A minibatch of responses: rows of prompt + response, the action targets (PAD elsewhere) and what
    the rollout measured at each action; `stats` describe the whole rollout (for the log)."""

    inputs: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T): the response's tokens, PAD elsewhere
    old_logprobs: torch.Tensor  # (B, T): log pi of the policy that sampled them
    ref_logprobs: torch.Tensor  # (B, T): log pi_ref
    advantages: torch.Tensor  # (B, T)
    returns: torch.Tensor  # (B, T): PPO's value targets (0 for GRPO)
    values: torch.Tensor  # (B, T): the value head's estimates at the rollout (0 for GRPO)
    stats: dict[str, float]


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each target (B, T), entropy of each position's distribution (B, T))."""
    logprobs = logits.float().log_softmax(-1)  # (B, T, V)
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    entropy = -(logprobs.exp() * logprobs).sum(-1)  # (B, T)
    return picked, entropy


class RolloutSource:
    """The RL batch source (see the module docstring); `len()` is optimiser steps per rollout."""

    def __init__(
        self,
        *,
        model: LanguageModel,
        tokenizer: Tokenizer,
        reference: nn.Module,
        reward: Reward,
        prompts: Sequence[tuple[list[int], dict[str, str]]],
        rl: RLConfig,
        algorithm: str,
        batch_size: int,
        seed: int,
        device: torch.device,
        precision: str,
        value_head: nn.Module | None = None,
    ) -> None:
        self.model, self.tokenizer, self.reference, self.reward = model, tokenizer, reference, reward
        self.rl, self.algorithm, self.batch_size = rl, algorithm, batch_size
        self.device, self.precision, self.value_head = device, precision, value_head
        self.prompts = ShuffledBatches(
            list(prompts), rl.prompts_per_rollout, seed=seed, collate=list, empty="no training prompts"
        )
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.kl = KLController(rl.kl_coef, rl.target_kl if algorithm == "ppo" else None, rl.kl_horizon)
        self.rollout: dict[str, torch.Tensor] | None = None
        self.plan: list[torch.Tensor] = []
        self.position = 0
        self.stats: dict[str, float] = {}
        self.options = SamplingOptions(
            max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_k=rl.top_k
        )

    @property
    def rollout_size(self) -> int:
        return self.rl.prompts_per_rollout * self.rl.samples_per_prompt

    def __len__(self) -> int:
        return self.rl.epochs * math.ceil(self.rollout_size / self.batch_size)

    def next(self) -> RolloutBatch:
        if self.rollout is None or self.position >= len(self.plan):
            self._collect()
        assert self.rollout is not None
        rows = self.plan[self.position]
        self.position += 1
        return RolloutBatch(**{name: self.rollout[name][rows] for name in FIELDS}, stats=self.stats)

    def _collect(self) -> None:
        """Sample a rollout from the current policy, score it, and plan its minibatches."""
        items = self.prompts.next()
        records = [record for _, record in items for _ in range(self.rl.samples_per_prompt)]
        lm = LoadedModel(self.model, self.tokenizer)
        completions = complete(
            lm,
            [ids for ids, _ in items],
            self.options,
            n=self.rl.samples_per_prompt,
            generator=self.generator,
        )
        inputs, targets = (t.to(self.device) for t in teacher_forced(completions, self.tokenizer.eos_id))
        mask = targets != PAD_ID
        with torch.no_grad(), eval_mode(self.model), autocast(self.device, self.precision):
            h, _ = self.model.hidden(inputs)  # (B, T, C)
            logprobs, entropy = token_logprobs(self.model.head.logits(h), targets)
            values = (
                self.value_head(h).float() * mask
                if self.value_head is not None
                else torch.zeros_like(logprobs)
            )
            ref_logits, _ = self.reference(inputs)  # (B, T, V)
            ref_logprobs, _ = token_logprobs(ref_logits, targets)
        logprobs, ref_logprobs = logprobs * mask, ref_logprobs * mask
        scores = self.reward(completions, records).clone().float().to(self.device)  # (B,)
        kl = float(((logprobs - ref_logprobs) * mask).sum(1).mean())
        beta = self.kl.beta
        if self.algorithm == "ppo":
            rewards = kl_penalised_rewards(scores, logprobs, ref_logprobs, mask, beta)
            advantages, returns = gae(rewards, values, mask, self.rl.gamma, self.rl.lam)
            advantages = whiten(advantages, mask)
        else:
            advantages = group_advantages(scores, self.rl.samples_per_prompt).to(self.device)[:, None] * mask
            returns = torch.zeros_like(advantages)
        self.kl.update(kl, len(completions))
        self.rollout = dict(
            zip(FIELDS, (inputs, targets, logprobs, ref_logprobs, advantages, returns, values), strict=True)
        )
        self.stats = {
            "reward": float(scores.mean()),
            "kl": kl,
            "kl_coef": beta,
            "entropy": float(masked_mean(entropy, mask)),
            "response_tokens": sum(len(c.ids) for c in completions) / len(completions),
            "finished": sum(c.finished for c in completions) / len(completions),
        }
        self.plan = []
        for _ in range(self.rl.epochs):
            order = torch.randperm(len(completions), generator=self.generator, device=self.device)
            self.plan += list(order.split(self.batch_size))
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts.state_dict(),
            "generator": self.generator.get_state(),
            "kl": self.kl.state_dict(),
            "rollout": self.rollout,
            "plan": self.plan,
            "position": self.position,
            "stats": self.stats,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts.load_state_dict(state["prompts"])
        self.generator.set_state(state["generator"].cpu())
        self.kl.load_state_dict(state["kl"])
        rollout = state["rollout"]
        self.rollout = None if rollout is None else {k: v.to(self.device) for k, v in rollout.items()}
        self.plan = [rows.to(self.device) for rows in state["plan"]]
        self.position = int(state["position"])
        self.stats = dict(state["stats"])
