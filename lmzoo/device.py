"""Device and precision choice, autocast, seeding and RNG state capture."""

from __future__ import annotations

import contextlib
import functools
import random
import sys
from typing import Any

import torch

from lmzoo.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_device(request: str = "auto") -> torch.device:
    """`auto` prefers cuda, then mps, then cpu; an explicit request that cannot be met is an error."""
    if request == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = request.split(":", 1)[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {request!r} requested, but this PyTorch build sees no CUDA device")
    if kind == "cuda" and ":" in request:
        index = int(request.split(":", 1)[1]) if request.split(":", 1)[1].isdigit() else -1
        if not 0 <= index < torch.cuda.device_count():
            raise ConfigError(f"device {request!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if kind == "mps" and not _mps_available():
        raise ConfigError("device 'mps' requested, but Apple's MPS backend is not available here")
    try:
        return torch.device(request)
    except RuntimeError:
        raise ConfigError(f"unknown device {request!r}; use auto, cpu, cuda, cuda:N or mps") from None


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_precision(device: torch.device, request: str = "auto") -> str:
    """Resolve `auto` to the fastest precision that trains stably on this device.

    CUDA: bf16 where the card supports it, else fp16 (with a GradScaler). CPU: bf16 only on CPUs
    with AVX512-BF16 or AMX (on others bf16 is emulated and much slower). MPS: fp32, since autocast
    support there varies by macOS and PyTorch version.
    """
    if request != "auto":
        if request == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision bf16 requested, but this CUDA device does not support bf16")
        return request
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_bf16_is_faster() else "fp32"
    return "fp32"


@functools.lru_cache(maxsize=1)
def cpu_bf16_is_faster() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 trains faster than fp32;
    elsewhere bf16 is emulated and much slower. Read from the CPU's features, not timed, so every run and
    evaluation on a machine picks the same precision however busy the machine is."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for forward passes; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def make_grad_scaler(device: torch.device, precision: str) -> Any:
    """A GradScaler for fp16 (bf16 and fp32 need none); None when not needed."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


class MaybeCompiled:
    """Calls a torch.compile'd model; if compiling fails (no compiler, unsupported op, old platform),
    warns once and runs the model eagerly from then on."""

    def __init__(self, model: torch.nn.Module, warn: Any = None, mode: str | None = None) -> None:
        self.model, self.warn = model, warn or (lambda message: print(message, file=sys.stderr))
        self.compiled: Any = None
        try:
            self.compiled = torch.compile(model, mode=None if mode == "default" else mode)
        except Exception as err:  # compile unavailable on this platform/build
            self._fall_back(err)

    def _fall_back(self, err: Exception) -> None:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        self.warn(f"warning: torch.compile is unavailable here ({first}); training without it")
        self.compiled = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:  # a backend failure on first use; eager re-raises real bugs
                self._fall_back(err)
        return self.model(*args, **kwargs)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA and MPS generators too


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from, in a form torch.load(weights_only=True) accepts."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if _mps_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and _mps_available():
        torch.mps.set_rng_state(state["mps"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
