"""Reinforcement learning on instruct prompts: PPO (policy + value head, KL-penalised reward, GAE) or GRPO
(group-relative advantages, KL in the loss), from the init_from run as policy and frozen reference.

Each evaluation answers `rl.eval_prompts` validation prompts greedily and reports the mean reward of those
answers (which picks `best`), their exact match overall and per task, their style rate and length, and the
KL divergence from the reference per response, measured along responses sampled from the policy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from torch import nn

from lmzoo.data.example_files import read_record_splits
from lmzoo.data.tokenizer import Tokenizer
from lmzoo.inference.instructions import (
    INSTRUCTION_FIELDS,
    encode_prompts,
    evaluate_instructions,
    render_prompt,
)
from lmzoo.inference.loaded import LoadedModel
from lmzoo.models.base import LanguageModel, ZooModel
from lmzoo.models.reward import ScalarHead, hidden_width
from lmzoo.training.reference import frozen_reference
from lmzoo.training.rl.objective import RLObjective
from lmzoo.training.rl.rewards import Reward, make_reward
from lmzoo.training.rl.rollout import RolloutSource
from lmzoo.training.tasks.base import Metrics, Task, TaskContext


def rl_task(context: TaskContext) -> Task:
    config, rl = context.config, context.config.rl
    algorithm, template = config.train.objective, config.data.template
    parts = read_record_splits(config.data, INSTRUCTION_FIELDS, ("task",))
    tokenizer = context.tokenizer(lambda: "")
    model = cast(LanguageModel, context.make_model(tokenizer.vocab_size))
    policy = LoadedModel(model, tokenizer)
    prompts = [render_prompt(template, r) for r in parts["train"]]
    train_ids = encode_prompts(policy, prompts, rl.max_new_tokens, config.data.train_files[0])
    val_records = parts["val"][: rl.eval_prompts]
    val_prompts = [render_prompt(template, r) for r in val_records]
    encode_prompts(policy, val_prompts, rl.max_new_tokens, config.data.val or "the validation split")
    reference = frozen_reference(model)
    value_head = ScalarHead(hidden_width(model)).to(context.device) if algorithm == "ppo" else None
    reward = make_reward(config, tokenizer, context.device, context.precision)
    source = RolloutSource(
        model=model,
        tokenizer=tokenizer,
        reference=reference,
        reward=reward,
        prompts=list(zip(train_ids, parts["train"], strict=True)),
        rl=rl,
        algorithm=algorithm,
        batch_size=context.batch_size,
        seed=config.seed,
        device=context.device,
        precision=context.precision,
        value_head=value_head,
    )
    return Task(
        tokenizer=tokenizer,
        target_tokenizer=None,
        model=model,
        batches=source,
        objective=RLObjective(model, rl, algorithm, value_head),
        tokens_per_epoch=len(train_ids) * rl.samples_per_prompt * rl.max_new_tokens,
        evaluate=_evaluation(context, policy, reference, tokenizer, reward, val_records),
        sample=context.sampler(model, tokenizer, val_prompts[0], greedy=True),
        auxiliary=value_head,
    )


def _evaluation(
    context: TaskContext,
    policy: LoadedModel,
    reference: nn.Module,
    tokenizer: Tokenizer,
    reward: Reward,
    records: list[dict[str, str]],
) -> Callable[[], Metrics]:
    """Greedy answers to the validation prompts: their reward (picks `best`), exact match, style, length,
    and the KL divergence from the reference along sampled answers."""
    config = context.config
    reference_lm = LoadedModel(cast(ZooModel, reference), tokenizer)  # read only through its forward

    def evaluate() -> Metrics:
        scores = evaluate_instructions(
            policy,
            records,
            config.data.template,
            max_new_tokens=config.rl.max_new_tokens,
            reference=reference_lm,
            seed=config.seed,
        )
        values = {
            "reward": float(reward(scores.completions, records).float().mean()),
            "exact_match": scores.exact_match,
            "style_rate": scores.style_rate,
            "kl": float(scores.kl or 0.0),
            "response_tokens": scores.response_tokens,
        }
        if len(scores.tasks) > 1:
            values.update(
                {
                    f"exact_match/{name}": s.as_dict()["exact_match"]
                    for name, s in sorted(scores.tasks.items())
                }
            )
        return Metrics(values, key="reward", higher_is_better=True)

    return evaluate
