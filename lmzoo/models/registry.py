"""The model registry: one decorator, one lookup, one listing.

Each family registers its class with a typed config class and a kind ("lm" or "seq2seq"); the
YAML `model:` section is validated against that config class, and tests are parametrized over
the registry so a new model is tested the day it is registered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from lmzoo.config import ModelConfig
from lmzoo.errors import ConfigError

ModelKind = Literal["lm", "seq2seq"]
REFERENCE_VOCAB = 69  # Tiny Shakespeare's 65 characters + 4 special tokens, for parameter counts


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: ModelKind
    description: str
    config: type[ModelConfig]
    cls: type[nn.Module]

    def default_config(self) -> ModelConfig:
        return self.config(name=self.name)

    def reference_params(self) -> int:
        """Parameters of the default config at the char-level Tiny Shakespeare vocabulary."""
        return count_parameters(build_model(self.default_config(), REFERENCE_VOCAB))


MODEL_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    name: str, *, config: type[ModelConfig], kind: ModelKind, description: str
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make `name` buildable from a YAML `model:` section."""

    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        if name in MODEL_REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        MODEL_REGISTRY[name] = ModelInfo(name, kind, description, config, cls)
        cls.kind = kind
        return cls

    return decorate


def get_model_info(name: str) -> ModelInfo:
    try:
        return MODEL_REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(MODEL_REGISTRY))
        raise ConfigError(f"unknown model {name!r}; known models: {known}") from None


def build_model(spec: ModelConfig | dict[str, Any], vocab_size: int | tuple[int, int]) -> nn.Module:
    """Instantiate a registered model from its config (or a plain dict) and vocabulary size(s)."""
    if isinstance(spec, dict):
        from lmzoo.config import validate_model_section

        spec = validate_model_section(spec, "model")
    info = get_model_info(spec.name)
    if not isinstance(spec, info.config):
        spec = info.config.model_validate(spec.model_dump())
    try:
        return info.cls(spec, vocab_size)
    except ValueError as err:  # a config that only fails once the vocabulary is known
        raise ConfigError(f"model: {err}") from None


def list_models() -> list[ModelInfo]:
    return [MODEL_REGISTRY[name] for name in sorted(MODEL_REGISTRY)]


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    params = {id(p): p for p in model.parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in params.values())
