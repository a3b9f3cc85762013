"""Scoring preference pairs with a reward model: rewards of chosen and rejected responses, pair accuracy.

A reward model (lmzoo.models.reward.RewardModel) reads prompt + response + <eos>; the pair accuracy is the
share of pairs whose chosen response gets the higher reward (ties count half), overall and, when the
records name a `kind` (the suite's `correct` and `style`), per kind.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from lmzoo.data.examples import ScoredPair, reward_pair_batch, scored_pair
from lmzoo.data.tokenizer import Tokenizer
from lmzoo.device import autocast
from lmzoo.errors import DataError
from lmzoo.models.base import eval_mode

PAIR_FIELDS = ("prompt", "chosen", "rejected")


def preference_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Reward accuracy (ties count half), mean margin, mean chosen and rejected rewards."""
    accuracy = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    return {
        "reward_accuracy": float(accuracy.mean()),
        "reward_margin": float((chosen - rejected).mean()),
        "reward_chosen": float(chosen.mean()),
        "reward_rejected": float(rejected.mean()),
    }


def encode_pairs(
    tokenizer: Tokenizer, records: Sequence[dict[str, str]], context: int | None, where: str
) -> list[ScoredPair]:
    """Each record as a reward model reads it; a pair longer than the context is a DataError naming it."""
    pairs = []
    for number, r in enumerate(records, start=1):
        pair = scored_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"])
        longest = max(len(pair.chosen), len(pair.rejected))
        if context is not None and longest > context:
            raise DataError(
                f"{where} record {number}: prompt, response and <eos> are {longest} tokens, longer than the "
                f"model's context of {context}"
            )
        pairs.append(pair)
    return pairs


def pair_rewards(
    model: torch.nn.Module, pairs: Sequence[ScoredPair], *, batch_size: int, precision: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards (chosen (N,), rejected (N,)) of the pairs, without gradients, `batch_size` pairs at a time."""
    device = next(model.parameters()).device
    chosen, rejected = [], []
    with torch.inference_mode(), eval_mode(model), autocast(device, precision):
        for start in range(0, len(pairs), batch_size):
            batch = reward_pair_batch(list(pairs[start : start + batch_size]))
            ids = torch.cat([batch.chosen, batch.rejected]).to(device)
            lengths = torch.cat([batch.chosen_lengths, batch.rejected_lengths]).to(device)
            starts = batch.prompt_lengths.repeat(2).to(device)
            c, r = model(ids, lengths, starts).float().cpu().chunk(2)
            chosen.append(c)
            rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


def pair_metrics(
    chosen: torch.Tensor, rejected: torch.Tensor, kinds: Sequence[str] = (), tasks: Sequence[str] = ()
) -> dict[str, float]:
    """The Bradley-Terry loss, `preference_metrics`, `reward_accuracy/<kind>` for each named kind and,
    with `tasks`, `reward_accuracy/<task>/<kind>` for each task and kind (what a reward model has not
    learned shows up per task)."""
    values = {
        "loss": float(-torch.nn.functional.logsigmoid(chosen - rejected).mean()),
        **preference_metrics(chosen, rejected),
    }
    groups: dict[str, list[int]] = defaultdict(list)
    for index, kind in enumerate(kinds):
        if kind:
            groups[kind].append(index)
    for index, (task, kind) in enumerate(zip(tasks, kinds, strict=False)):
        if task and kind:
            groups[f"{task}/{kind}"].append(index)
    for group, rows in sorted(groups.items(), key=lambda item: (item[0].count("/"), item[0])):
        values[f"reward_accuracy/{group}"] = preference_metrics(chosen[rows], rejected[rows])[
            "reward_accuracy"
        ]
    return values
