"""Reward modelling: a scalar head on a language model, trained on preference pairs (Bradley-Terry).

The run's network is `RewardModel` (lmzoo.models.reward) around the model of the run it starts from (or
a fresh one): it reads prompt + response + <eos> and scores the hidden state at the <eos>. Evaluation
reports the loss (which picks `best`), the pair accuracy on the validation pairs (ties count half) and,
when records name a `kind`, the accuracy of each kind (lmzoo.inference.preferences).
"""

from __future__ import annotations

import torch

from lmzoo.data.example_files import read_record_splits
from lmzoo.data.examples import ScoredPair, ShuffledBatches, reward_pair_batch
from lmzoo.inference.preferences import PAIR_FIELDS, encode_pairs, pair_metrics, pair_rewards
from lmzoo.training.objectives import RewardObjective
from lmzoo.training.tasks.base import Metrics, Task, TaskContext


def reward_task(context: TaskContext) -> Task:
    config = context.config
    parts = read_record_splits(config.data, PAIR_FIELDS, ("kind",), nonempty=("chosen", "rejected"))
    tokenizer = context.tokenizer(
        lambda: "\n".join(r["prompt"] + r["chosen"] + r["rejected"] for r in parts["train"])
    )
    context_len = config.model.context_len
    train = encode_pairs(tokenizer, parts["train"], context_len, config.data.train_files[0])
    val = encode_pairs(tokenizer, parts["val"], context_len, config.data.val or "the validation split")
    kinds = [r.get("kind", "") for r in parts["val"]]
    batches = ShuffledBatches(train, context.batch_size, seed=config.seed, collate=reward_pair_batch)
    model = context.make_model(tokenizer.vocab_size)

    def rewards(pairs: list[ScoredPair]) -> tuple[torch.Tensor, torch.Tensor]:
        return pair_rewards(model, pairs, batch_size=context.eval_batch_size, precision=context.precision)

    def evaluate() -> Metrics:
        return Metrics(pair_metrics(*rewards(val), kinds))

    first = parts["val"][0]

    def sample(step: int) -> str:
        chosen, rejected = rewards(val[:1])
        return (
            f"{first['prompt']}\nchosen {first['chosen']!r}: {float(chosen[0]):.3f}\n"
            f"rejected {first['rejected']!r}: {float(rejected[0]):.3f}"
        )

    return Task(
        tokenizer=tokenizer,
        target_tokenizer=None,
        model=model,
        batches=batches,
        objective=RewardObjective(),
        tokens_per_epoch=sum(len(pair.chosen) + len(pair.rejected) for pair in train),
        evaluate=evaluate,
        sample=sample,
    )
