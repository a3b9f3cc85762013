"""The training loop: config -> setup -> one explicit loop -> checkpoints.

Everything a resumed run needs to continue exactly where an uninterrupted run would be is saved
in `checkpoints/last/state.pt`: optimiser, grad scaler, every RNG, the data position, a carried
recurrent state, the step, the best validation loss and the early-stopping counter.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmzoo import checkpoint as ckpt
from lmzoo.config import RunConfig, TrainConfig, config_to_yaml, load_config
from lmzoo.device import (
    MaybeCompiled,
    autocast,
    make_grad_scaler,
    pick_device,
    pick_precision,
    rng_state,
    seed_everything,
    set_rng_state,
)
from lmzoo.errors import ConfigError, TrainingStopped
from lmzoo.objectives import to_device
from lmzoo.peft import parameter_counts
from lmzoo.tasks import Task, build_task
from lmzoo.tracking import ProgressBar, Tracker

EXIT_NONFINITE = 3
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


def lr_at(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Learning rate for optimiser step `step` (0-based): linear warmup, then decay to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW/Adam/SGD; weight decay on matrices only; the fused kernel where the build has it."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    kwargs = {"lr": cfg.lr, "betas": cfg.betas, "eps": cfg.eps}
    if device.type in ("cuda", "cpu", "mps"):
        try:
            return cls(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            pass  # no fused kernel for this device/dtype in this build
    return cls(groups, **kwargs)


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
class StepResult:
    loss: float  # mean over the step's micro-batches
    grad_norm: float
    tokens: int
    applied: bool  # False when the loss or gradient was not finite and the update was skipped
    metrics: dict[str, float] = field(default_factory=dict)  # objective-specific (DPO rewards, ...)


class TrainStep:
    """One optimiser step: `grad_accum` micro-batches of forward/backward, then unscale, clip, update.

    The objective turns a batch into a loss (and keeps any state carried between batches); the
    step owns the optimiser and the fp16 grad scaler, so `train` and the benchmark run the same step.
    """

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Any, objective: Any,
        cfg: TrainConfig, device: torch.device, precision: str,
    ) -> None:
        self.model, self.optimizer, self.batches, self.objective = model, optimizer, batches, objective
        self.cfg, self.device, self.precision = cfg, device, precision
        self.scaler = make_grad_scaler(device, precision)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.forward = MaybeCompiled(model) if cfg.compile else model

    def __call__(self, lr: float) -> StepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum, loss_sum, tokens = self.cfg.grad_accum, 0.0, 0
        metrics: dict[str, float] = {}
        for _ in range(accum):
            batch = to_device(self.batches.next(), self.device)
            with autocast(self.device, self.precision):
                loss, batch_tokens = self.objective(self.forward, batch)
            for key, value in getattr(self.objective, "metrics", {}).items():
                metrics[key] = metrics.get(key, 0.0) + value / accum
            scaled = loss / accum
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += float(loss.detach())
            tokens += batch_tokens
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip or float("inf")))
        loss = loss_sum / accum
        applied = self.scaler is not None or (math.isfinite(loss) and math.isfinite(grad_norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update itself when gradients overflowed
            self.scaler.update()
        elif applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=loss, grad_norm=grad_norm, tokens=tokens, applied=applied, metrics=metrics)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "data": self.batches.state_dict(),
            **self.objective.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.batches.load_state_dict(state["data"])
        self.objective.load_state_dict(state)


@dataclass
class Setup:
    """Everything a training run is built from (also what scripts/bench.py times)."""

    device: torch.device
    precision: str
    task: Task
    stepper: TrainStep
    max_steps: int

    @property
    def model(self) -> torch.nn.Module:
        return self.task.model


def setup_training(config: RunConfig, tokenizers: dict[str, Any] | None = None) -> Setup:
    """Read and tokenize the data (fitting tokenizers unless given), build model, optimiser and step."""
    device = pick_device(config.train.device)
    precision = pick_precision(device, config.train.precision)
    seed_everything(config.seed)
    if tokenizers is None and config.init_from:
        tokenizers = ckpt.load_tokenizers(Path(config.init_from))  # reused as they are, never re-fitted
    task = build_task(config, device, precision, tokenizers)
    task.model.label_smoothing = config.train.label_smoothing
    optimizer = make_optimizer(task.model, config.train, device)
    stepper = TrainStep(task.model, optimizer, task.batches, task.objective, config.train, device, precision)
    return Setup(device=device, precision=precision, task=task, stepper=stepper,
                 max_steps=config.train.resolved_max_steps(len(task.batches)))


def prepare_run_dir(config: RunConfig, resume: bool) -> tuple[Path, bool]:
    """(run directory, resuming?) A new run gets a fresh directory; --resume finds the newest of this name."""
    assert config.name is not None
    if resume:
        found = ckpt.latest_run(config.out_dir, config.name)
        if found is None:
            raise ConfigError(f"--resume: no run named {config.name!r} with a checkpoint under {config.out_dir}/")
        return found, True
    return ckpt.new_run_dir(config.out_dir, config.name), False


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
    """Train the run the config describes (or continue it with resume=True); return its directory."""
    run_dir, resuming = prepare_run_dir(config, resume)
    if resuming:
        ckpt.recover_checkpoints(run_dir)
        saved = load_config(run_dir / "config.yaml")
        _check_same_shape(config, saved)
        config.name = saved.name
    setup = setup_training(config, tokenizers=ckpt.load_tokenizers(run_dir) if resuming else None)
    task, stepper, device, precision = setup.task, setup.stepper, setup.device, setup.precision
    model, tcfg, max_steps = task.model, config.train, setup.max_steps

    loop = LoopState()
    if resuming:
        last = ckpt.checkpoint_dir(run_dir, "last")
        ckpt.load_checkpoint_weights(model, last)
        saved_state = ckpt.load_train_state(last / ckpt.STATE, device)
        stepper.load_state_dict(saved_state)
        set_rng_state(saved_state["rng"])
        loop = LoopState(**{k: saved_state[k] for k in ("step", "tokens_seen", "best_val", "evals_since_best")})
    else:
        run_dir.mkdir(parents=True, exist_ok=False)
        for filename, tokenizer in task.tokenizers().items():
            tokenizer.save(run_dir / filename)
    ckpt.atomic_write_text(run_dir / "config.yaml", config_to_yaml(config))

    tracker = Tracker(run_dir, resume_step=loop.step if resuming else None)
    bar = ProgressBar(max_steps, loop.step, enabled=progress)
    trainable, total = parameter_counts(model)
    share = f", {trainable:,} trainable ({trainable / total:.2%})" if trainable != total else ""
    bar.write(
        f"lmzoo: {'resuming' if resuming else 'training'} {config.model.name} ({total:,} parameters{share}, "
        f"vocab {task.tokenizer.vocab_size}) on {device.type}, {precision}, {max_steps} steps -> {run_dir}"
    )
    if not resuming:
        tracker.log(0, {"params/trainable": float(trainable), "params/total": float(total)})
    hint = resume_hint or f"lmzoo train <config> --resume  (run {run_dir})"

    def save_last() -> None:
        state = {**asdict(loop), **stepper.state_dict(), "rng": rng_state()}
        ckpt.save_checkpoint(run_dir, "last", model, info={"step": loop.step, "best_val_loss": loop.best_val},
                             train_state=state)

    def run_eval() -> bool:
        """Evaluate, log, keep the best weights; return True when early stopping says stop."""
        metrics = task.evaluate()
        tracker.log(loop.step, {f"val/{key}": value for key, value in metrics.items() if key != "tokens"})
        score = metrics["loss"] if tcfg.best_metric == "loss" else -metrics["bleu"]  # lower is better
        improved = score < loop.best_val
        if improved:
            loop.best_val, loop.evals_since_best = score, 0
            info = {"step": loop.step, **{f"val_{k}": v for k, v in metrics.items() if k != "tokens"}}
            ckpt.save_checkpoint(run_dir, "best", model, info=info)
        else:
            loop.evals_since_best += 1
        tracker.text(loop.step, "sample", task.sample(loop.step))
        others = "".join(f", {key} {value:.4f}" for key, value in metrics.items() if key not in ("loss", "ppl", "tokens"))
        bar.write(
            f"step {loop.step}: val loss {metrics['loss']:.4f}, ppl {metrics['ppl']:.2f}{others}"
            f"{' (best)' if improved else ''}"
        )
        return tcfg.patience is not None and loop.evals_since_best >= tcfg.patience

    window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
    window_extra: dict[str, float] = {}
    stopped_early = False
    model.train()
    try:
        with GracefulStop() as stop:
            while loop.step < max_steps:
                lr = lr_at(loop.step, tcfg, max_steps)
                result = stepper(lr)
                if not result.applied:
                    if tcfg.nan_policy == "stop":
                        raise TrainingStopped(
                            f"the loss became {result.loss} (gradient norm {result.grad_norm}) at step "
                            f"{loop.step + 1}; stopped without saving it. The last good checkpoint is in "
                            f"{run_dir / 'checkpoints'} (lower train.lr, or set train.nan_policy: skip)",
                            EXIT_NONFINITE,
                        )
                    bar.write(f"warning: non-finite loss or gradient at step {loop.step + 1}; update skipped")
                loop.step += 1
                loop.tokens_seen += result.tokens
                window_loss += result.loss
                window_steps += 1
                for key, value in result.metrics.items():
                    window_extra[key] = window_extra.get(key, 0.0) + value
                window_tokens += result.tokens
                if on_step is not None:
                    on_step(loop.step, result.loss)

                at_end = loop.step == max_steps
                if loop.step % tcfg.log_every == 0 or at_end:
                    speed = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                    tracker.log(loop.step, {
                        "train/loss": window_loss / window_steps, "lr": lr, "grad_norm": result.grad_norm,
                        "tokens_per_sec": speed, "train/epoch": loop.tokens_seen / max(1, task.tokens_per_epoch),
                        **{f"train/{key}": value / window_steps for key, value in window_extra.items()},
                    })
                    window_extra = {}
                    bar.update(window_steps, loss=f"{window_loss / window_steps:.3f}", lr=f"{lr:.2e}",
                               tok_s=f"{speed:,.0f}")
                    window_loss, window_steps, window_tokens = 0.0, 0, 0
                    window_start = time.perf_counter()
                if loop.step % tcfg.eval_every == 0 or at_end:
                    stopped_early = run_eval()
                    window_start = time.perf_counter()  # tokens/s measures training only
                every = tcfg.checkpoint_every or tcfg.eval_every
                if loop.step % every == 0 or at_end or stopped_early or stop.signal is not None:
                    save_last()
                if stop.signal is not None:
                    raise TrainingStopped(
                        f"interrupted at step {loop.step}/{max_steps}; saved {run_dir / 'checkpoints' / 'last'}. "
                        f"Resume with: {hint}", EXIT_SIGNAL[stop.signal],
                    )
                if stopped_early:
                    bar.write(f"early stopping at step {loop.step}: no improvement in {tcfg.patience} evaluations")
                    break
    finally:
        bar.close()
        tracker.close()
    return run_dir
