"""The training loop: config -> setup -> one explicit loop -> checkpoints.

Everything a resumed run needs to continue exactly where an uninterrupted run would be is saved
in `checkpoints/last/state.pt`: optimiser, grad scaler, every RNG, the data position, a carried
recurrent state, the step, the best validation loss and the early-stopping counter.
"""

from __future__ import annotations

import copy
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lmzoo import checkpoint as ckpt
from lmzoo.config import RunConfig, config_to_yaml, load_config
from lmzoo.data import RandomWindows
from lmzoo.device import (
    pick_device,
    pick_precision,
    rng_state,
    seed_everything,
    set_rng_state,
)
from lmzoo.distributed import (
    SINGLE,
    DistContext,
    ShardedBatches,
    any_rank,
    from_main,
    full_state_dict,
    gather_to_main,
    init_distributed,
    rank_device,
    shutdown,
    unsharded,
    wrap_model,
)
from lmzoo.errors import ConfigError, TrainingStopped
from lmzoo.optim import TrainStep, lr_at, make_optimizer
from lmzoo.peft import parameter_counts
from lmzoo.tasks import Task, build_task
from lmzoo.tracking import ProgressBar, Tracker

EXIT_NONFINITE = 3
EXIT_PEER_FAILED = 4
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class GracefulStop:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary; a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_SIGNAL:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user wants out now
        self.signal = signum
        print(
            f"\n{signal.Signals(signum).name} received: saving a checkpoint at the end of this step "
            "(Ctrl-C again to quit without saving)",
            file=sys.stderr,
        )

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class LoopState:
    """The counters a resumed run restores."""

    step: int = 0
    tokens_seen: int = 0
    best_val: float = math.inf
    evals_since_best: int = 0


@dataclass
class Setup:
    """Everything a training run is built from (also what scripts/bench.py times)."""

    device: torch.device
    precision: str
    task: Task
    stepper: TrainStep
    max_steps: int
    dist: DistContext = SINGLE
    save_copy: torch.nn.Module | None = None  # FSDP: an unsharded CPU copy that checkpoints are written from

    @property
    def model(self) -> torch.nn.Module:
        return self.task.model


def setup_training(
    config: RunConfig, tokenizers: dict[str, Any] | None = None, dist: DistContext = SINGLE
) -> Setup:
    """Read and tokenize the data (fitting tokenizers unless given), build model, optimiser and step."""
    device = rank_device(dist, pick_device(config.train.device))
    precision = pick_precision(device, config.train.precision)
    seed_everything(config.seed)
    if tokenizers is None and config.init_from:
        tokenizers = ckpt.load_tokenizers(Path(config.init_from))  # reused as they are, never re-fitted
    task = build_task(config, device, precision, tokenizers, batch_scale=dist.world_size)
    if dist.enabled:
        task.batches = ShardedBatches(task.batches, dist)
        seed_everything(config.seed + dist.rank)  # same initial weights, different dropout per rank
    task.model.label_smoothing = config.train.label_smoothing
    # FSDP shards the weights in place; checkpoints gather them into this full CPU copy first.
    sharded = dist.enabled and config.train.strategy == "fsdp"
    save_copy = copy.deepcopy(task.model).cpu() if sharded else None
    forward = wrap_model(task.model, dist, device, config.train.strategy)
    optimizer = make_optimizer(task.model, config.train, device)
    stepper = TrainStep(task.model, optimizer, task.batches, task.objective, config.train, device, precision,
                        forward=forward, dist=dist)
    return Setup(device=device, precision=precision, task=task, stepper=stepper, dist=dist, save_copy=save_copy,
                 max_steps=config.train.resolved_max_steps(len(task.batches)))


def prepare_run_dir(config: RunConfig, resume: bool, dist: DistContext = SINGLE) -> tuple[Path, bool]:
    """(run directory, resuming?) A new run gets a fresh directory; --resume finds the newest of this name.

    Under torchrun every rank must agree on the directory, so rank 0 decides.
    """
    assert config.name is not None
    if resume:
        found = from_main(dist, ckpt.latest_run(config.out_dir, config.name) if dist.is_main else None)
        if found is None:
            raise ConfigError(f"--resume: no run named {config.name!r} with a checkpoint under {config.out_dir}/")
        return Path(found), True
    return Path(from_main(dist, str(ckpt.new_run_dir(config.out_dir, config.name)) if dist.is_main else None)), False


def _check_same_shape(config: RunConfig, saved: RunConfig) -> None:
    for section in ("model", "tokenizer"):
        new, old = getattr(config, section).model_dump(), getattr(saved, section).model_dump()
        for key in sorted(set(new) | set(old)):
            if new.get(key) != old.get(key):
                raise ConfigError(
                    f"--resume: {section}.{key} is {new.get(key)!r} in the config but {old.get(key)!r} in the run; "
                    "a resumed run must keep its model and tokenizer (start a new run instead)"
                )


def train(
    config: RunConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    resume_hint: str | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Train the run the config describes (or continue it with resume=True); return its directory.

    Under torchrun this runs on every rank (DDP, or FSDP with train.strategy: fsdp); rank 0 alone
    writes the run directory.
    """
    dist = init_distributed(config.train.device)
    try:
        return Trainer(config, dist, resume=resume, progress=progress, resume_hint=resume_hint).run(on_step)
    except (RuntimeError, OSError) as err:
        if dist.enabled and _is_peer_failure(err):
            raise TrainingStopped(
                f"rank {dist.rank}: another process of this distributed run stopped ({str(err).splitlines()[0][:160]}); "
                "exiting", EXIT_PEER_FAILED,
            ) from None
        raise
    finally:
        shutdown(dist)


def _is_peer_failure(err: Exception) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return any(word in text for word in ("connection", "gloo", "nccl", "timed out", "timeout", "broken pipe", "peer"))


class Trainer:
    """One training run: setup from the config (or the run being resumed), then the loop."""

    def __init__(self, config: RunConfig, dist: DistContext, *, resume: bool, progress: bool,
                 resume_hint: str | None) -> None:
        self.config, self.dist = config, dist
        self.run_dir, self.resuming = prepare_run_dir(config, resume, dist)
        if self.resuming:
            if dist.is_main:
                ckpt.recover_checkpoints(self.run_dir)
            _barrier(dist)
            saved = load_config(self.run_dir / "config.yaml")
            _check_same_shape(config, saved)
            config.name = saved.name
        self.setup = setup_training(config, ckpt.load_tokenizers(self.run_dir) if self.resuming else None, dist)
        self.task, self.stepper = self.setup.task, self.setup.stepper
        self.model, self.tcfg = self.task.model, config.train
        self.save_copy = self.setup.save_copy
        self.loop = LoopState()
        if self.resuming:
            self._restore()
        elif dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=False)
            for filename, tokenizer in self.task.tokenizers().items():
                tokenizer.save(self.run_dir / filename)
        if dist.is_main:
            ckpt.atomic_write_text(self.run_dir / "config.yaml", config_to_yaml(config))
        self.tracker = Tracker(self.run_dir, resume_step=self.loop.step if self.resuming else None) if dist.is_main else None
        self.bar = ProgressBar(self.setup.max_steps, self.loop.step, enabled=progress and dist.is_main,
                               quiet=not dist.is_main)
        self.hint = resume_hint or f"lmzoo train <config> --resume  (run {self.run_dir})"
        self._announce()

    def _announce(self) -> None:
        trainable, total = parameter_counts(self.model)
        share = f", {trainable:,} trainable ({trainable / total:.2%})" if trainable != total else ""
        world = self.dist.world_size
        batch = self.config.data.batch_size
        scale = (f", {world} processes x batch {batch} x accumulation {self.tcfg.grad_accum} = global batch "
                 f"{world * batch * self.tcfg.grad_accum}") if self.dist.enabled else ""
        self.bar.write(
            f"lmzoo: {'resuming' if self.resuming else 'training'} {self.config.model.name} ({total:,} parameters"
            f"{share}, vocab {self.task.tokenizer.vocab_size}) on {self.setup.device.type}, {self.setup.precision}, "
            f"{self.setup.max_steps} steps{scale} -> {self.run_dir}"
        )
        if self.tracker is not None and not self.resuming:
            self.tracker.log(0, {"params/trainable": float(trainable), "params/total": float(total),
                                 "global_batch": float(world * self.config.data.batch_size * self.tcfg.grad_accum)})

    # ---- checkpoints ----------------------------------------------------------------------------

    def _rank_state(self) -> dict[str, Any]:
        return {"rng": rng_state(), **self.task.objective.state_dict()}

    def _checkpoint_model(self) -> torch.nn.Module | None:
        """The module to write (rank 0), after gathering FSDP shards (a collective: every rank calls it)."""
        if self.save_copy is None:
            return self.model if self.dist.is_main else None
        state = full_state_dict(self.model, self.dist)
        if not self.dist.is_main:
            return None
        self.save_copy.load_state_dict(state)
        return self.save_copy

    def save_last(self) -> None:
        ranks = gather_to_main(self.dist, self._rank_state())
        optimizer_state = self._optimizer_state()
        model = self._checkpoint_model()
        if self.dist.is_main:
            state = {**asdict(self.loop), **self.stepper.state_dict(), "optimizer": optimizer_state,
                     "ranks": ranks, "world_size": self.dist.world_size}
            ckpt.save_checkpoint(self.run_dir, "last", model,
                                 info={"step": self.loop.step, "best_val_loss": self.loop.best_val}, train_state=state)
        _barrier(self.dist)

    def _optimizer_state(self) -> dict[str, Any]:
        if self.save_copy is None:
            return self.stepper.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.stepper.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _restore(self) -> None:
        last = ckpt.checkpoint_dir(self.run_dir, "last")
        state = ckpt.load_train_state(last / ckpt.STATE, "cpu")
        saved_world = state.get("world_size", 1)
        sequential = not isinstance(getattr(self.task.batches, "batches", self.task.batches), RandomWindows)
        if saved_world != self.dist.world_size and sequential:
            raise ConfigError(
                f"--resume: this run was checkpointed with {saved_world} process(es); its data order depends on "
                f"the process count, so resume it with {saved_world} (random-window runs may change it)"
            )
        if self.save_copy is None:
            ckpt.load_checkpoint_weights(self.model, last)
            self.stepper.load_state_dict(state)
        else:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            ckpt.load_checkpoint_weights(self.save_copy, last)
            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, self.save_copy.state_dict(), options=options)
            set_optimizer_state_dict(self.model, self.stepper.optimizer, state["optimizer"], options=options)
            self.stepper.batches.load_state_dict(state["data"])
        ranks = state.get("ranks") or [{"rng": state.get("rng"), "carried": state.get("carried")}]
        mine = ranks[self.dist.rank] if self.dist.rank < len(ranks) else ranks[0]
        self.task.objective.load_state_dict(mine)
        set_rng_state(mine["rng"])
        self.loop = LoopState(**{k: state[k] for k in ("step", "tokens_seen", "best_val", "evals_since_best")})

    # ---- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> bool:
        """Evaluate (every rank: sharded models need them all), log and keep the best weights (rank 0).

        Returns True when early stopping says stop; rank 0's decision is every rank's.
        """
        with unsharded(self.model):
            metrics = self.task.evaluate()
            sample = self.task.sample(self.loop.step)
        score = metrics["loss"] if self.tcfg.best_metric == "loss" else -metrics["bleu"]  # lower is better
        improved = score < self.loop.best_val
        if improved:
            self.loop.best_val, self.loop.evals_since_best = score, 0
            model = self._checkpoint_model()
            if self.dist.is_main:
                info = {"step": self.loop.step, **{f"val_{k}": v for k, v in metrics.items() if k != "tokens"}}
                ckpt.save_checkpoint(self.run_dir, "best", model, info=info)
        else:
            self.loop.evals_since_best += 1
        if self.tracker is not None:
            self.tracker.log(self.loop.step, {f"val/{k}": v for k, v in metrics.items() if k != "tokens"})
            self.tracker.text(self.loop.step, "sample", sample)
        others = "".join(f", {'BLEU' if k == 'bleu' else k} {v:.4f}" for k, v in metrics.items()
                         if k not in ("loss", "ppl", "tokens"))
        self.bar.write(
            f"step {self.loop.step}: val loss {metrics['loss']:.4f}, ppl {metrics['ppl']:.2f}{others}"
            f"{' (best)' if improved else ''}"
        )
        stop = self.tcfg.patience is not None and self.loop.evals_since_best >= self.tcfg.patience
        return bool(from_main(self.dist, stop))

    # ---- the loop -------------------------------------------------------------------------------

    def run(self, on_step: Callable[[int, float], None] | None = None) -> Path:
        loop, tcfg, max_steps, device = self.loop, self.tcfg, self.setup.max_steps, self.setup.device
        window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
        window_extra: dict[str, float] = {}
        stopped_early = False
        self.model.train()
        if self.config.init_from and loop.step == 0:
            self.evaluate()  # a fine-tune's starting point: the base model's scores, in the same run
        try:
            with GracefulStop() as stop:
                while loop.step < max_steps:
                    lr = lr_at(loop.step, tcfg, max_steps)
                    result = self.stepper(lr)
                    if not result.applied:
                        if tcfg.nan_policy == "stop":
                            raise TrainingStopped(
                                f"the loss became {result.loss} (gradient norm {result.grad_norm}) at step "
                                f"{loop.step + 1}; stopped without saving it. The last good checkpoint is in "
                                f"{self.run_dir / 'checkpoints'} (lower train.lr, or set train.nan_policy: skip)",
                                EXIT_NONFINITE,
                            )
                        self.bar.write(f"warning: non-finite loss or gradient at step {loop.step + 1}; update skipped")
                    loop.step += 1
                    loop.tokens_seen += result.tokens * self.dist.world_size
                    window_loss += result.loss
                    window_steps += 1
                    window_tokens += result.tokens * self.dist.world_size
                    for key, value in result.metrics.items():
                        window_extra[key] = window_extra.get(key, 0.0) + value
                    if on_step is not None:
                        on_step(loop.step, result.loss)

                    at_end = loop.step == max_steps
                    if loop.step % tcfg.log_every == 0 or at_end:
                        speed = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                        if self.tracker is not None:
                            self.tracker.log(loop.step, {
                                "train/loss": window_loss / window_steps, "lr": lr, "grad_norm": result.grad_norm,
                                "tokens_per_sec": speed,
                                "train/epoch": loop.tokens_seen / max(1, self.task.tokens_per_epoch),
                                **{f"train/{key}": value / window_steps for key, value in window_extra.items()},
                            })
                        self.bar.update(window_steps, loss=f"{window_loss / window_steps:.3f}", lr=f"{lr:.2e}",
                                        tok_s=f"{speed:,.0f}")
                        window_loss, window_steps, window_tokens, window_extra = 0.0, 0, 0, {}
                        window_start = time.perf_counter()
                    if loop.step % tcfg.eval_every == 0 or at_end:
                        stopped_early = self.evaluate()
                        window_start = time.perf_counter()  # tokens/s measures training only
                    signalled = any_rank(self.dist, stop.signal is not None, device)  # all ranks stop together
                    every = tcfg.checkpoint_every or tcfg.eval_every
                    if loop.step % every == 0 or at_end or stopped_early or signalled:
                        self.save_last()
                    if signalled:
                        code = EXIT_SIGNAL.get(stop.signal, EXIT_SIGNAL[signal.SIGTERM])
                        raise TrainingStopped(
                            f"interrupted at step {loop.step}/{max_steps}; saved "
                            f"{self.run_dir / 'checkpoints' / 'last'}. Resume with: {self.hint}", code,
                        )
                    if stopped_early:
                        self.bar.write(
                            f"early stopping at step {loop.step}: no improvement in {tcfg.patience} evaluations"
                        )
                        break
        finally:
            self.bar.close()
            if self.tracker is not None:
                self.tracker.close()
        return self.run_dir


def _barrier(dist: DistContext) -> None:
    if dist.enabled:
        import torch.distributed

        torch.distributed.barrier()
