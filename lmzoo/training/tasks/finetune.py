"""Fine-tuning data kinds: instruction tuning (SFT, loss on responses) and preference tuning (DPO)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from lmzoo.data.batch import to_device
from lmzoo.data.encoders import id_dtype
from lmzoo.data.example_files import ExampleSplits
from lmzoo.data.examples import ShuffledBatches, preference_batch, prompt_response_ids, sft_batch
from lmzoo.data.packed import PackedExamples
from lmzoo.data.tokenizer import Tokenizer
from lmzoo.device import autocast
from lmzoo.errors import DataError
from lmzoo.inference.evaluate import token_weighted_loss
from lmzoo.inference.scoring import evaluate_stream
from lmzoo.models.base import eval_mode
from lmzoo.training.objectives import DPOObjective, LMObjective, preference_metrics, sequence_logprobs
from lmzoo.training.reference import frozen_reference
from lmzoo.training.tasks.base import Metrics, Task, TaskContext


def sft_task(context: TaskContext) -> Task:
    """Instruction tuning: the loss covers only the response tokens of each templated record."""
    config = context.config
    splits = ExampleSplits(config.data, ("instruction", "input", "output"))

    def prompts(records: Iterator[dict[str, str]]) -> Iterator[tuple[str, str]]:
        for r in records:
            yield config.data.template.format(instruction=r["instruction"], input=r["input"]), r["output"]

    tokenizer = context.tokenizer(lambda: "\n".join(p + r for p, r in prompts(splits.stream("train"))))
    context_len, dtype = config.model.context_len, id_dtype(tokenizer.vocab_size)
    encoded = {  # streamed into compact tables: a few bytes per token
        name: PackedExamples.of(
            (prompt_response_ids(tokenizer, p, r, context_len) for p, r in prompts(records)), 2, dtype=dtype
        )
        for name, records in (("train", splits.weighted("train")), ("val", splits.stream("val")))
    }
    if not len(encoded["val"]):
        splits.split("val")  # the one-line error for an empty validation split
    batches = ShuffledBatches(encoded["train"], context.batch_size, seed=config.seed, collate=sft_batch)
    val = ShuffledBatches(encoded["val"], context.eval_batch_size, seed=0, collate=sft_batch, shuffle=False)
    model = context.make_model(tokenizer.vocab_size)

    def evaluate() -> Metrics:
        return Metrics(
            token_weighted_loss(
                model,
                val,
                lambda b: (model(b.inputs, targets=b.targets)[0], b.targets),
                device=context.device,
                precision=context.precision,
            )
        )

    return Task(
        tokenizer=tokenizer,
        target_tokenizer=None,
        model=model,
        batches=batches,
        objective=LMObjective(carry=False, label_smoothing=config.train.label_smoothing),
        tokens_per_epoch=int(encoded["train"].lengths(1).sum()),
        evaluate=evaluate,
        sample=context.sampler(model, tokenizer, next(prompts(splits.stream("val")))[0], stop=("\n\n",)),
    )


def dpo_task(context: TaskContext) -> Task:
    """Preference tuning with DPO against the frozen init_from model.

    Metrics: the DPO loss (which picks `best`), reward accuracy and margins, and, when the base
    run's validation text is still on disk, the language-model loss on it (what DPO costs).
    """
    config = context.config
    splits = ExampleSplits(config.data, ("prompt", "chosen", "rejected"))
    tokenizer = context.tokenizer(lambda: "")
    context_len = config.model.context_len

    def encode(split: str) -> PackedExamples:
        """(chosen (inputs, targets), rejected (inputs, targets)) of each record, in compact tables."""
        pairs = (
            (
                prompt_response_ids(tokenizer, r["prompt"], r["chosen"], context_len),
                prompt_response_ids(tokenizer, r["prompt"], r["rejected"], context_len),
            )
            for r in splits.stream(split)
        )
        return PackedExamples.of(
            pairs,
            4,
            dtype=id_dtype(tokenizer.vocab_size),
            shape=lambda f: ((f[0], f[1]), (f[2], f[3])),
            flat=lambda e: (*e[0], *e[1]),
        )

    train, held_out = encode("train"), splits.split("val")
    batches = ShuffledBatches(train, context.batch_size, seed=config.seed, collate=preference_batch)
    val = ShuffledBatches(
        encode("val"), context.eval_batch_size, seed=0, collate=preference_batch, shuffle=False
    )
    model = context.make_model(tokenizer.vocab_size)
    objective = DPOObjective(config.train.dpo_beta, _reference(model), config.train.dpo_nll)
    pretrain_val = _base_validation_stream(context, tokenizer)
    window = context.base_config.seq_len if context.base_config is not None else config.seq_len
    readable = context.loaded(model, tokenizer, window)

    def evaluate() -> Metrics:
        values = _dpo_validation(model, objective, val, context)
        if pretrain_val is not None:
            lm = evaluate_stream(
                readable,
                pretrain_val,
                max_tokens=context.base_config.eval_tokens if context.base_config else None,
            )
            values["pretrain_loss"] = lm["loss"]
        return Metrics(values)

    return Task(
        tokenizer=tokenizer,
        target_tokenizer=None,
        model=model,
        batches=batches,
        objective=objective,
        tokens_per_epoch=int(train.lengths(1).sum() + train.lengths(3).sum()),
        evaluate=evaluate,
        sample=context.sampler(model, tokenizer, held_out[0]["prompt"]),
    )


def _reference(model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """DPO's frozen reference log-probabilities: the init_from model (lmzoo.training.reference)."""
    reference = frozen_reference(model)
    return lambda inputs, targets: sequence_logprobs(reference, inputs, targets)


def _base_validation_stream(context: TaskContext, tokenizer: Tokenizer) -> torch.Tensor | None:
    """The base run's own validation text, to watch what DPO costs the language model (if still on disk)."""
    base = context.base_config
    if base is None or base.data.format != "text":
        return None
    try:
        return context.corpus(base.data, tokenizer).tensor("val")
    except DataError:  # its corpus is gone (or no longer readable): no pretraining loss
        return None


def _dpo_validation(
    model: torch.nn.Module, objective: DPOObjective, val: ShuffledBatches, context: TaskContext
) -> dict[str, float]:
    chosen, rejected, losses = [], [], []
    with torch.inference_mode(), eval_mode(model):
        for batch in val:
            with autocast(context.device, context.precision):
                loss, _ = objective(model, to_device(batch, context.device))
            rewards = objective.last_rewards
            assert rewards is not None
            chosen.append(rewards[0])
            rejected.append(rewards[1])
            losses.append(float(loss) * len(rewards[0]))
    chosen_all, rejected_all = torch.cat(chosen), torch.cat(rejected)
    return {"loss": sum(losses) / len(chosen_all), **preference_metrics(chosen_all, rejected_all)}
