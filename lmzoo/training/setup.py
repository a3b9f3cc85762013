"""Setting a run up: device and precision, the run directory to write (new, resumed, or restarted),
the task (data, tokenizers, model) and the optimisation step. scripts/bench.py times what this builds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmzoo.config.schema import RunConfig
from lmzoo.device import pick_device, pick_precision, seed_everything
from lmzoo.run import Run
from lmzoo.training.distributed import SINGLE, DistContext, ShardedBatches, from_main, rank_device, wrap_model
from lmzoo.training.optim import TrainStep, make_optimizer
from lmzoo.training.rundirs import NewRun, for_resume, reserve
from lmzoo.training.tasks import Task, TaskContext, build_task


@dataclass
class Setup:
    """Everything a training run is built from (also what scripts/bench.py times)."""

    device: torch.device
    precision: str
    task: Task
    stepper: TrainStep
    max_steps: int
    run: Run
    dist: DistContext = SINGLE

    @property
    def model(self) -> torch.nn.Module:
        return self.task.model

    @property
    def sharded(self) -> bool:
        """FSDP: each rank holds a shard of the weights; checkpoints gather them on rank 0."""
        return self.dist.enabled and self.run.config.train.strategy == "fsdp"


def setup_training(
    config: RunConfig,
    tokenizers: dict[str, Any] | None = None,
    dist: DistContext = SINGLE,
    run: Run | None = None,
    *,
    progress: bool = False,
    say: Callable[[str], None] | None = None,
) -> Setup:
    """Read and tokenize the data (fitting tokenizers unless given), build model, optimiser and step.

    `run` is the run directory being trained; without one (benchmarks, tests) an unsaved Run stands in.
    """
    run = run or Run(Path(config.out_dir) / (config.name or "run"), config)
    device = rank_device(dist, pick_device(config.train.device))
    precision = pick_precision(device, config.train.precision)
    seed_everything(config.seed)
    base = run.base if config.init_from else None
    if tokenizers is None and base is not None:
        tokenizers = base.tokenizers()  # a fine-tune reuses its base run's tokenizers as they are
    context = TaskContext(
        config=config,
        device=device,
        precision=precision,
        tokenizers=tokenizers,
        make_model=lambda vocab: run.fresh_model(device, vocab_size=vocab),
        batch_size=config.data.batch_size * dist.world_size,
        base_config=base.config if base else None,
        dist=dist,
        progress=progress,
        say=say,
    )
    task = build_task(context)
    if dist.enabled:
        task.batches = ShardedBatches(task.batches, dist)
        seed_everything(config.seed + dist.rank)  # same initial weights, different dropout per rank
    forward = wrap_model(task.model, dist, device, config.train.strategy)
    optimizer = make_optimizer(task.trained, config.train, device)
    stepper = TrainStep(
        task.trained,
        optimizer,
        task.batches,
        task.objective,
        config.train,
        device,
        precision,
        forward=forward,
        dist=dist,
    )
    return Setup(
        device=device,
        precision=precision,
        task=task,
        stepper=stepper,
        dist=dist,
        run=run,
        max_steps=config.train.resolved_max_steps(len(task.batches)),
    )


def open_run(
    config: RunConfig, resume: bool, dist: DistContext = SINGLE, say: Callable[[str], None] = print
) -> tuple[Run, bool]:
    """(the run to train, resuming?) A new run gets a fresh directory; --resume continues the newest run
    of this name from its last checkpoint, or starts it when there is none yet (a requeued job that
    died before its first checkpoint). Under torchrun rank 0 decides and the others follow."""
    found = None
    if dist.is_main and resume:
        resumable = for_resume(config)
        found = None if resumable is None else str(resumable.path)
        if resumable is None:
            say(
                f"--resume: run {config.name!r} has no checkpoint under {config.out_dir}/ yet; starting it at step 0"
            )
    found = from_main(dist, found)
    if found is not None:
        if not dist.is_main:  # rank 0's for_resume checked the config already
            config.name = Run.open(found).config.name
        return Run(Path(found), config), True
    reserved = reserve(config, restart=resume) if dist.is_main else None
    path = from_main(dist, None if reserved is None else str(reserved.path))
    return reserved or NewRun(Path(path), config), False
