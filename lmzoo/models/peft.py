"""Parameter-efficient fine-tuning: LoRA and bottleneck adapters, for every model family.

LoRA (Hu et al., 2021) re-parametrises a frozen weight W0 as W0 + (alpha/r) B A with A (r x in)
random and B (out x r) zero, so the adapted model starts equal to the base. lmzoo applies it with
torch.nn.utils.parametrize, which works on any weight tensor: Linear layers, the fused Q/K/V
projection of attention, and the input and recurrent matrices of nn.LSTM / nn.GRU / the Elman RNN
(a place where PEFT's LoRA does not reach). `dropout` drops whole rank components of B A during
training (rank dropout), since a weight re-parametrisation never sees the layer's input.

Adapters (Houlsby et al., 2019) insert a bottleneck down-projection -> GELU -> up-projection with
a residual connection after each feed-forward block (Transformers) or each recurrent layer; the
up-projection starts at zero, so the model starts equal to the base.

Only the LoRA / adapter tensors are trainable (and saved); the base stays frozen and loaded from
the run the fine-tune started from.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from lmzoo.config.schema import FinetuneConfig
from lmzoo.errors import ConfigError
from lmzoo.models.base import ZooModel


class LoRA(nn.Module):
    """The parametrisation W -> W + (alpha/r) B A (B starts at zero)."""

    def __init__(self, weight: torch.Tensor, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        out_features, in_features = weight.shape[0], int(weight[0].numel())
        self.shape = weight.shape
        self.A = nn.Parameter(weight.new_empty(r, in_features))
        self.B = nn.Parameter(weight.new_zeros(out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / r
        self.dropout = dropout
        self.enabled = True

    def delta(self) -> torch.Tensor:
        a: torch.Tensor = self.A
        if self.training and self.dropout > 0:
            keep = torch.rand(a.shape[0], 1, device=a.device) >= self.dropout
            a = a * keep / (1 - self.dropout)
        return (self.scale * (self.B @ a)).view(self.shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta() if self.enabled else weight


class Adapter(nn.Module):
    """h -> h + up(gelu(down(h))), with `up` zero-initialised."""

    def __init__(self, width: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.enabled = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(torch.nn.functional.gelu(self.down(h))) if self.enabled else h


class AdapterAfter(nn.Module):
    """Runs `inner` and passes its output (or, for recurrent layers, its first output) through an adapter."""

    def __init__(self, inner: nn.Module, width: int, bottleneck: int) -> None:
        super().__init__()
        self.inner = inner
        self.adapter = Adapter(width, bottleneck)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        if isinstance(out, tuple):  # (outputs, state) of a recurrent layer
            return (self.adapter(out[0]), *out[1:])
        return self.adapter(out)


def _adapter_sites(model: ZooModel, patterns: list[str] | None) -> list[tuple[nn.Module, str, int]]:
    """(parent, attribute, width) of every site the model offers for adapters (matching `patterns`)."""
    sites = []
    for name, width in model.adapter_sites():
        if patterns is None or any(fnmatch.fnmatch(name, pattern) for pattern in patterns):
            parent_name, _, attribute = name.rpartition(".")
            sites.append((model.get_submodule(parent_name) if parent_name else model, attribute, width))
    return sites


def apply_finetune(model: ZooModel, config: FinetuneConfig) -> ZooModel:
    """Freeze the base and add LoRA or adapters in place (no-op for method: full); returns the model."""
    if config.method == "full":
        return model
    for param in model.parameters():
        param.requires_grad_(False)
    if config.method == "lora":
        patterns = config.targets if config.targets is not None else list(model.default_lora_targets)
        targets = [
            name
            for name, p in model.named_parameters()
            if p.dim() >= 2
            and any(fnmatch.fnmatch(name, pattern) for pattern in patterns)
            and "embedding" not in name
        ]
        if not targets:
            raise ConfigError(
                f"finetune.targets: {patterns} match no weight of this model; "
                f"its weights are: {', '.join(n for n, p in model.named_parameters() if p.dim() >= 2)}"
            )
        for name in targets:
            owner_name, _, attribute = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            weight = getattr(owner, attribute)
            parametrize.register_parametrization(
                owner, attribute, LoRA(weight, config.r, config.alpha, config.dropout)
            )
            _refresh_rnn(owner)
    else:
        sites = _adapter_sites(model, config.sites)
        if not sites:
            offered = ", ".join(name for name, _ in model.adapter_sites()) or "none"
            raise ConfigError(
                f"finetune.sites: {config.sites} match no adapter site of this model (it offers: {offered})"
            )
        for parent, name, width in sites:
            inner = getattr(parent, name)
            setattr(
                parent,
                name,
                AdapterAfter(inner, width, config.bottleneck).to(next(inner.parameters()).device),
            )
    return model


def _refresh_rnn(module: nn.Module) -> None:
    """nn.LSTM/GRU cache their weight list; rebuild it so the parametrised weight is used (cuDNN included)."""
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()


def merge_finetune(model: ZooModel) -> ZooModel:
    """Fold LoRA updates into the weights (W0 + s B A) and unfreeze everything; returns the model.

    Adapters are extra layers: they cannot be folded into the base weights and stay in the model.
    """
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(getattr(module, "parametrizations")):  # noqa: B009  (added by parametrize)
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
            _refresh_rnn(module)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model (LoRA and adapters switched off): DPO's reference without a second copy."""
    switches = [m for m in model.modules() if isinstance(m, (LoRA, Adapter))]
    for module in switches:
        module.enabled = False
    try:
        yield
    finally:
        for module in switches:
            module.enabled = True


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, (LoRA, Adapter)) for m in model.modules())


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the tensors fine-tuning trains (what an adapter checkpoint stores)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) distinct parameters."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
