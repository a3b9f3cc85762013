"""The optimisation step: learning-rate schedule, optimiser, and one (accumulated) update.

`TrainStep` is what the training loop and scripts/bench.py both call, so a benchmark times
exactly the step that trains.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lmzoo.config import TrainConfig
from lmzoo.device import MaybeCompiled, autocast, make_grad_scaler
from lmzoo.distributed import SINGLE, DistContext, mean_over_ranks
from lmzoo.objectives import to_device


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
    `forward` is what the objective calls: the model, or its DDP/FSDP/compiled wrapper.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: Any,
        objective: Any,
        cfg: TrainConfig,
        device: torch.device,
        precision: str,
        forward: Any = None,
        dist: DistContext = SINGLE,
    ) -> None:
        self.model, self.optimizer, self.batches, self.objective = model, optimizer, batches, objective
        self.cfg, self.device, self.precision = cfg, device, precision
        self.scaler = make_grad_scaler(device, precision)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.wrapped = forward if forward is not None else model
        self.dist = dist
        self.forward = MaybeCompiled(self.wrapped) if cfg.compile else self.wrapped

    def _gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
        if enabled:
            return contextlib.nullcontext()
        if hasattr(self.wrapped, "no_sync"):  # DDP
            return self.wrapped.no_sync()
        if hasattr(self.wrapped, "set_requires_gradient_sync"):  # FSDP (fully_shard)
            self.wrapped.set_requires_gradient_sync(False)
            return _restore_fsdp_sync(self.wrapped)
        return contextlib.nullcontext()

    def __call__(self, lr: float) -> StepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum, loss_sum, tokens = self.cfg.grad_accum, 0.0, 0
        metrics: dict[str, float] = {}
        for micro in range(accum):
            batch = to_device(self.batches.next(), self.device)
            with self._gradient_sync(micro == accum - 1):
                with autocast(self.device, self.precision):
                    loss, batch_tokens = self.objective(self.forward, batch)
                scaled = loss / accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            for key, value in getattr(self.objective, "metrics", {}).items():
                metrics[key] = metrics.get(key, 0.0) + value / accum
            loss_sum += float(loss.detach())
            tokens += batch_tokens
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip or float("inf"))
        grad_norm = float(
            norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        )  # FSDP returns a DTensor
        loss = mean_over_ranks(self.dist, loss_sum / accum, self.device)  # the global batch's loss
        applied = self.scaler is not None or (math.isfinite(loss) and math.isfinite(grad_norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update itself when gradients overflowed
            self.scaler.update()
        elif applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=loss, grad_norm=grad_norm, tokens=tokens, applied=applied, metrics=metrics)

    def state_dict(self) -> dict[str, Any]:
        """What all ranks share: optimiser, grad scaler, data position."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "data": self.batches.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.batches.load_state_dict(state["data"])


@contextlib.contextmanager
def _restore_fsdp_sync(module: Any):
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
