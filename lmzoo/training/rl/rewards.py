"""What a response earns: a reward model's score, or a programmatic reward computed from its text.

A reward is called with the rollout's completions (prompt ids, response ids, text) and the records
their prompts came from, and returns one number per completion (B,). `rl.reward` names one:
`model` (the reward model of `rl.reward_run`), or a registered programmatic reward: `exact_match`
(1 when the response equals the record's output, ignoring one final full stop: verifiable) and
`style` (1 when the response ends with a full stop). `register_reward` adds more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lmzoo.config.schema import RunConfig
from lmzoo.data.examples import pad_rows
from lmzoo.data.tokenizer import Tokenizer
from lmzoo.device import autocast
from lmzoo.errors import ConfigError
from lmzoo.inference.complete import Completion
from lmzoo.inference.instructions import has_style, is_exact_match
from lmzoo.models.reward import RewardModel
from lmzoo.run import Run

Reward = Callable[[Sequence[Completion], Sequence[dict[str, str]]], torch.Tensor]


def exact_match_reward(completions: Sequence[Completion], records: Sequence[dict[str, str]]) -> torch.Tensor:
    return torch.tensor(
        [float(is_exact_match(c.text, r["output"])) for c, r in zip(completions, records, strict=True)]
    )


def style_reward(completions: Sequence[Completion], records: Sequence[dict[str, str]]) -> torch.Tensor:
    return torch.tensor([float(has_style(c.text)) for c in completions])


REWARDS: dict[str, Reward] = {"exact_match": exact_match_reward, "style": style_reward}


def register_reward(name: str, reward: Reward) -> None:
    """Make `reward` available as rl.reward: <name>."""
    REWARDS[name] = reward


class ModelReward:
    """A reward model's score of prompt + response + <eos>, in batches, without gradients."""

    def __init__(
        self, model: RewardModel, eos_id: int, precision: str = "fp32", batch_size: int = 64
    ) -> None:
        self.model, self.eos_id, self.precision, self.batch_size = model, eos_id, precision, batch_size
        self.device = next(model.parameters()).device

    def __call__(self, completions: Sequence[Completion], records: Sequence[dict[str, str]]) -> torch.Tensor:
        scores = []
        with torch.inference_mode(), autocast(self.device, self.precision):
            for start in range(0, len(completions), self.batch_size):
                chunk = completions[start : start + self.batch_size]
                ids, lengths = pad_rows([c.prompt_ids + c.ids + [self.eos_id] for c in chunk])
                starts = torch.tensor([len(c.prompt_ids) for c in chunk], device=self.device)
                scores.append(self.model(ids.to(self.device), lengths.to(self.device), starts).float().cpu())
        return torch.cat(scores)


def make_reward(config: RunConfig, tokenizer: Tokenizer, device: torch.device, precision: str) -> Reward:
    """The reward `config.rl` names; a reward model must read text with the policy's tokenizer."""
    name = config.rl.reward
    if name != "model":
        if name not in REWARDS:
            raise ConfigError(
                f"rl.reward: unknown reward {name!r}; known: model, {', '.join(sorted(REWARDS))}"
            )
        return REWARDS[name]
    assert config.rl.reward_run is not None  # RunConfig.check
    if not Path(config.rl.reward_run).is_dir():
        raise ConfigError(f"rl.reward_run: {config.rl.reward_run} is not a run directory")
    run = Run.open(config.rl.reward_run)
    if not run.is_reward_model:
        raise ConfigError(
            f"rl.reward_run: {run.path} is not a reward model (train it with train.objective: reward)"
        )
    if run.tokenizer.to_dict() != tokenizer.to_dict():
        raise ConfigError(
            f"rl.reward_run: {run.path} reads text with another tokenizer than the policy; train the reward "
            "model from the same base run"
        )
    model = run.reward_model("best", device).requires_grad_(False)
    return ModelReward(model, tokenizer.eos_id, precision, config.data.eval_rows)
