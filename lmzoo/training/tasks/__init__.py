"""What a run trains on, per kind of data: tokenizers, batches, objective, evaluation, samples.

The training loop (lmzoo.training.loop) sees only a `Task`; it never asks which family or data format it
is training. `build_task` reads and tokenizes the data and builds the batch sources first (every
data problem surfaces there, before any model is built), then asks the run for its model.
Evaluation returns `Metrics`, which name the value that picks `checkpoints/best` and its direction.
"""

from __future__ import annotations

from lmzoo.training.tasks.base import BatchSource, Metrics, ModelFactory, Objective, Task, TaskContext
from lmzoo.training.tasks.finetune import dpo_task, sft_task
from lmzoo.training.tasks.lm import lm_task
from lmzoo.training.tasks.reward import reward_task
from lmzoo.training.tasks.rl import rl_task
from lmzoo.training.tasks.seq2seq import seq2seq_task

__all__ = ["BatchSource", "Metrics", "ModelFactory", "Objective", "Task", "TaskContext", "build_task"]


def build_task(context: TaskContext) -> Task:
    """The task for the run's config: language modelling, seq2seq, SFT, DPO, a reward model, PPO or GRPO."""
    config = context.config
    if config.kind == "seq2seq":
        return seq2seq_task(context)
    if config.train.objective == "reward":
        return reward_task(context)
    if config.train.objective in ("ppo", "grpo"):
        return rl_task(context)
    builders = {"instruct": sft_task, "preference": dpo_task}
    return builders.get(config.data.format, lm_task)(context)
