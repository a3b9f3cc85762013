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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmzoo import checkpoint as ckpt
from lmzoo.config import RunConfig, TrainConfig, config_to_yaml, load_config
from lmzoo.data import encode_stream, make_batches, read_splits
from lmzoo.device import autocast, make_grad_scaler, pick_device, pick_precision, rng_state, seed_everything, set_rng_state
from lmzoo.errors import ConfigError, TrainingStopped
from lmzoo.evaluate import evaluate_lm
from lmzoo.generate import SamplingOptions, generate
from lmzoo.models import build_model, count_parameters
from lmzoo.models.base import detach_state
from lmzoo.tokenizers import fit_tokenizer, load_tokenizer
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
    carried: Any = None


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
    saved_state: dict[str, Any] | None = None
    if resuming:
        ckpt.recover_checkpoints(run_dir)
        saved = load_config(run_dir / "config.yaml")
        _check_same_shape(config, saved)
        config.name = saved.name
    device = pick_device(config.train.device)
    precision = pick_precision(device, config.train.precision)
    seed_everything(config.seed)

    splits = read_splits(config.data)  # all data problems surface before a model is built
    if resuming:
        tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    else:
        fit_text = splits.train if config.tokenizer.fit_on == "train" else splits.train + splits.val + splits.test
        tokenizer = fit_tokenizer(config.tokenizer, fit_text)
    train_stream = encode_stream(tokenizer, splits.train)
    val_stream = encode_stream(tokenizer, splits.val)
    seq_len = config.seq_len
    config.data.seq_len = seq_len

    model = build_model(config.model, tokenizer.vocab_size)
    model.label_smoothing = config.train.label_smoothing
    model.to(device)
    carry = model.carries_state
    sequential = config.data.sampling == "sequential" or (config.data.sampling == "auto" and carry)
    carry = carry and sequential
    batches = make_batches(train_stream, config.data, seq_len, sequential=sequential, seed=config.seed)
    tcfg = config.train
    max_steps = tcfg.resolved_max_steps(len(batches))
    optimizer = make_optimizer(model, tcfg, device)
    scaler = make_grad_scaler(device, precision)

    loop = LoopState()
    if resuming:
        last = ckpt.checkpoint_dir(run_dir, "last")
        ckpt.load_weights(model, last / ckpt.WEIGHTS)
        saved_state = ckpt.load_train_state(last / ckpt.STATE, device)
        optimizer.load_state_dict(saved_state["optimizer"])
        if scaler is not None and saved_state.get("scaler"):
            scaler.load_state_dict(saved_state["scaler"])
        batches.load_state_dict(saved_state["data"])
        set_rng_state(saved_state["rng"])
        loop = LoopState(
            step=saved_state["step"], tokens_seen=saved_state["tokens_seen"], best_val=saved_state["best_val"],
            evals_since_best=saved_state["evals_since_best"], carried=saved_state.get("carried"),
        )
    else:
        run_dir.mkdir(parents=True, exist_ok=False)
        tokenizer.save(run_dir / "tokenizer.json")
    ckpt.atomic_write_text(run_dir / "config.yaml", config_to_yaml(config))

    tracker = Tracker(run_dir, resume_step=loop.step if resuming else None)
    bar = ProgressBar(max_steps, loop.step, enabled=progress)
    n_params = count_parameters(model)
    bar.write(
        f"lmzoo: {'resuming' if resuming else 'training'} {config.model.name} ({n_params:,} parameters, "
        f"vocab {tokenizer.vocab_size}) on {device.type}, {precision}, {max_steps} steps -> {run_dir}"
    )
    hint = resume_hint or f"lmzoo train <config> --resume  (run {run_dir})"
    sample_options = SamplingOptions(
        max_new_tokens=min(config.sample.max_new_tokens, 200), temperature=config.sample.temperature,
        top_k=config.sample.top_k, top_p=config.sample.top_p, repetition_penalty=config.sample.repetition_penalty,
    )

    def train_state() -> dict[str, Any]:
        return {
            "step": loop.step, "tokens_seen": loop.tokens_seen, "best_val": loop.best_val,
            "evals_since_best": loop.evals_since_best, "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_state(),
            "data": batches.state_dict(), "carried": detach_state(loop.carried) if carry else None,
        }

    def save_last() -> None:
        ckpt.save_checkpoint(run_dir, "last", model, info={"step": loop.step, "val_loss": loop.best_val},
                             train_state=train_state())

    def run_eval() -> bool:
        """Evaluate, log, keep the best weights; return True when early stopping says stop."""
        metrics = evaluate_lm(
            model, val_stream, batch_size=config.data.eval_batch_size or config.data.batch_size, seq_len=seq_len,
            max_batches=tcfg.eval_batches, device=device, precision=precision,
        )
        tracker.log(loop.step, {"val/loss": metrics["loss"], "val/ppl": metrics["ppl"]})
        improved = metrics["loss"] < loop.best_val
        if improved:
            loop.best_val, loop.evals_since_best = metrics["loss"], 0
            ckpt.save_checkpoint(run_dir, "best", model, info={"step": loop.step, "val_loss": metrics["loss"]})
        else:
            loop.evals_since_best += 1
        sample = _sample_text(model, tokenizer, config, sample_options, device, precision, loop.step)
        tracker.text(loop.step, "sample", sample)
        bar.write(
            f"step {loop.step}: val loss {metrics['loss']:.4f}, ppl {metrics['ppl']:.2f}"
            f"{' (best)' if improved else ''}"
        )
        return tcfg.patience is not None and loop.evals_since_best >= tcfg.patience

    params = [p for p in model.parameters() if p.requires_grad]
    window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
    stopped_early = False
    model.train()
    try:
        with GracefulStop() as stop:
            while loop.step < max_steps:
                lr = lr_at(loop.step, tcfg, max_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                step_loss = 0.0
                for _ in range(tcfg.grad_accum):
                    x, y, starts_epoch = batches.next()
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    state_in = None if (starts_epoch or not carry) else loop.carried
                    with autocast(device, precision):
                        loss, state_out = model(x, state_in, targets=y)
                    if carry:
                        loop.carried = detach_state(state_out)
                    scaled = loss / tcfg.grad_accum
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    step_loss += float(loss.detach()) / tcfg.grad_accum
                    window_tokens += y.numel()
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip or float("inf"))
                if not (math.isfinite(step_loss) and math.isfinite(float(grad_norm))) and scaler is None:
                    optimizer.zero_grad(set_to_none=True)
                    if tcfg.nan_policy == "stop":
                        raise TrainingStopped(
                            f"the loss became {step_loss} at step {loop.step + 1}; stopped without saving it. "
                            f"The last good checkpoint is in {run_dir / 'checkpoints'} "
                            "(lower train.lr, or set train.nan_policy: skip)", EXIT_NONFINITE,
                        )
                    bar.write(f"warning: non-finite loss/gradient at step {loop.step + 1}; step skipped")
                else:
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                loop.step += 1
                loop.tokens_seen += y.numel() * tcfg.grad_accum
                window_loss += step_loss
                window_steps += 1
                if on_step is not None:
                    on_step(loop.step, step_loss)

                if loop.step % tcfg.log_every == 0 or loop.step == max_steps:
                    elapsed = time.perf_counter() - window_start
                    speed = window_tokens / max(elapsed, 1e-9)
                    tracker.log(loop.step, {
                        "train/loss": window_loss / window_steps, "lr": lr, "grad_norm": float(grad_norm),
                        "tokens_per_sec": speed, "train/epoch": loop.tokens_seen / max(1, len(train_stream)),
                    })
                    bar.update(window_steps, loss=f"{window_loss / window_steps:.3f}", lr=f"{lr:.2e}",
                               tok_s=f"{speed:,.0f}")
                    window_loss, window_steps, window_tokens = 0.0, 0, 0
                    window_start = time.perf_counter()

                at_end = loop.step == max_steps
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


def _sample_text(model, tokenizer, config: RunConfig, options: SamplingOptions, device, precision, step: int) -> str:
    """A short sample for TensorBoard, from its own generator so training randomness is untouched."""
    generator = torch.Generator(device=device).manual_seed(config.seed + step)
    was_training = model.training
    model.eval()
    try:
        with autocast(device, precision):
            text = "".join(generate(model, tokenizer, config.sample.prompt, options, generator=generator))
    finally:
        model.train(was_training)
    return config.sample.prompt + text
