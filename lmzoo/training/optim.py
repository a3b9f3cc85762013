"""The optimisation step: learning-rate schedule, optimiser, and one (accumulated) update.

`TrainStep` is what the training loop and scripts/bench.py both call, so a benchmark times
exactly the step that trains.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from lmzoo.config import TrainConfig
from lmzoo.data.batch import to_device
from lmzoo.device import MaybeCompiled, autocast, make_grad_scaler
from lmzoo.training.distributed import SINGLE, DistContext, mean_over_ranks


def lr_at(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Learning rate for optimiser step `step` (0-based): linear warmup, then decay to min_lr.

    `noam` is the inverse-square-root schedule of "Attention Is All You Need", written with its peak:
    lr * min(s^-0.5, s * w^-1.5) * sqrt(w) for step s = step + 1 and w = warmup_steps; it rises linearly to
    `lr` at step w and decays as 1/sqrt(s) after. (The paper's d_model^-0.5 * min(...) is this form
    with lr = (d_model * w)^-0.5, e.g. 7.0e-4 for d_model 512 and 4000 warmup steps.)
    """
    if cfg.schedule == "noam":
        s, w = step + 1, max(1, cfg.warmup_steps)
        return cfg.lr * min(s**-0.5, s * w**-1.5) * w**0.5
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def _undecorated(method: Callable[..., Any]) -> Callable[..., Any]:
    return inspect.unwrap(getattr(method, "__func__", method))


class _Eager(torch.optim.Optimizer):
    """An optimiser whose methods skip torch's torch.compile wrappers.

    torch's optimisers wrap `add_param_group`, `step`, `zero_grad` and `(load_)state_dict` so that they
    behave under torch.compile; the wrappers import torch._dynamo (and sympy) on their first call, which
    costs 1.5 to 2 s of every training start on a CPU. lmzoo never compiles an optimiser step, and in eager
    mode the wrappers do nothing else, so these call the methods underneath: the same arithmetic,
    bit for bit, without the import.
    """

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _undecorated(torch.optim.Optimizer.add_param_group)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _undecorated(torch.optim.Optimizer.zero_grad)(self, set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return _undecorated(torch.optim.Optimizer.state_dict)(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _undecorated(torch.optim.Optimizer.load_state_dict)(self, state_dict)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        # what torch's wrapper does in eager mode: no autograd through the update unless differentiable
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))):
            return _undecorated(super().step)(self, closure)


class AdamW(_Eager, torch.optim.AdamW):
    """torch.optim.AdamW without the torch.compile wrappers (see `_Eager`)."""


class Adam(_Eager, torch.optim.Adam):
    """torch.optim.Adam without the torch.compile wrappers (see `_Eager`)."""


class SGD(_Eager, torch.optim.SGD):
    """torch.optim.SGD without the torch.compile wrappers (see `_Eager`)."""


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW/Adam/SGD; weight decay on matrices only; the fused kernel where the build has it."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    cls: type[AdamW] | type[Adam] = AdamW if cfg.optimizer == "adamw" else Adam
    if device.type in ("cuda", "cpu", "mps"):
        try:
            return cls(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass  # no fused kernel for this device/dtype in this build
    return cls(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


@dataclass
class StepResult:
    """One optimiser step. `loss`, `grad_norm` and `finite` stay on the device (0-dim tensors) so that a
    step never waits for the accelerator: read them (float(), bool()) at log steps only."""

    loss: torch.Tensor  # mean over the step's micro-batches (and over ranks)
    grad_norm: torch.Tensor
    tokens: int
    finite: torch.Tensor  # bool: loss and gradient finite (with fp16 always True: the grad scaler skips)
    metrics: dict[str, float] = field(default_factory=dict)  # objective-specific (DPO rewards, ...)

    @property
    def applied(self) -> bool:
        """Whether the update was applied (False: non-finite, skipped). Reading it waits for the device."""
        return bool(self.finite)


class NonFiniteWatch:
    """Counts steps with a non-finite loss or gradient on the device, and remembers the first and the
    last of them, so the training loop checks (one sync) at log, evaluation and checkpoint steps only."""

    def __init__(self, device: torch.device) -> None:
        self.first = torch.zeros((), dtype=torch.long, device=device)  # 0: none yet
        self.last = torch.zeros((), dtype=torch.long, device=device)
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self.reported = 0

    def add(self, finite: torch.Tensor, step: int) -> None:
        """Record optimiser step `step` (1-based); no host synchronisation."""
        bad = ~finite
        self.first = torch.where(bad & (self.first == 0), step, self.first)
        self.last = torch.where(bad, step, self.last)
        self.count = self.count + bad

    def new_bad_steps(self) -> tuple[int, int, int]:
        """(bad steps since the last call, first bad step, last bad step): one read of the device."""
        first, last, count = torch.stack([self.first, self.last, self.count]).tolist()
        new, self.reported = count - self.reported, count
        return new, first, last


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
        mode = cfg.compile if isinstance(cfg.compile, str) else None
        self.forward = MaybeCompiled(self.wrapped, mode=mode) if cfg.compile else self.wrapped
        # CUDA graphs: each forward starts a new generation of the captured graphs' output buffers
        self.cudagraphs = device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")
        # Fused AdamW/Adam skip an update on the device when `found_inf` is 1 (what the grad scaler uses):
        # a non-finite step is then skipped without a host sync. Others (SGD, FSDP's DTensors) sync once.
        sharded = dist.enabled and cfg.strategy == "fsdp"
        self.skips_on_device = bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and not sharded
        self.loss_dtype = torch.float64 if device.type == "cpu" else torch.float32

    def _gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
        if enabled:
            return contextlib.nullcontext()
        if callable(no_sync := getattr(self.wrapped, "no_sync", None)):  # DDP
            return no_sync()
        if callable(set_sync := getattr(self.wrapped, "set_requires_gradient_sync", None)):  # FSDP
            set_sync(False)
            return _restore_fsdp_sync(self.wrapped)
        return contextlib.nullcontext()

    def __call__(self, lr: float) -> StepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum, tokens = self.cfg.grad_accum, 0
        loss_sum: torch.Tensor | None = None
        metrics: dict[str, float] = {}
        for micro in range(accum):
            if self.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            batch = to_device(self.batches.next(), self.device)
            with self._gradient_sync(micro == accum - 1):
                with autocast(self.device, self.precision):
                    loss, batch_tokens = self.objective(self.forward, batch)
                scaled = loss / accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            for key, value in getattr(self.objective, "metrics", {}).items():
                metrics[key] = metrics.get(key, 0.0) + value / accum
            value = loss.detach().to(self.loss_dtype, copy=True)  # stays on the device: no sync
            loss_sum = value if loss_sum is None else loss_sum + value
            tokens += batch_tokens
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip or float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP returns a DTensor
        assert loss_sum is not None  # accum >= 1 micro-batches
        mean_loss = mean_over_ranks(self.dist, loss_sum / accum, self.device)  # the global batch's loss
        finite = self._update(mean_loss, norm)
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(
            loss=mean_loss, grad_norm=norm.detach(), tokens=tokens, finite=finite, metrics=metrics
        )

    def _update(self, loss: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """Apply the update unless the loss or gradient is not finite; return that flag (on the device)."""
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update itself when gradients overflowed
            self.scaler.update()
            return torch.ones((), dtype=torch.bool, device=self.device)
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        if self.skips_on_device:
            setattr(self.optimizer, "found_inf", (~finite).to(torch.float32))  # noqa: B010  (the fused kernel reads it)
            try:
                self.optimizer.step()
            finally:
                delattr(self.optimizer, "found_inf")
        elif bool(finite):  # an optimiser without a device-side skip: one sync per step
            self.optimizer.step()
        return finite

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
def _restore_fsdp_sync(module: Any) -> Iterator[None]:
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
