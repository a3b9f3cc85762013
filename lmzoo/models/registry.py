"""The model registry: one decorator, one lookup, one listing.

Each family registers its class (a `LanguageModel` or `Seq2SeqModel`, which fixes its kind) with a
typed config class; the YAML `model:` section is validated against that config class, and tests
are parametrized over the registry so a new model is tested the day it is registered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError
from torch import nn

from lmzoo.config.errors import describe
from lmzoo.config.schema import ModelConfig
from lmzoo.errors import ConfigError
from lmzoo.models.base import ZooModel

ModelKind = Literal["lm", "seq2seq"]
REFERENCE_VOCAB = 69  # Tiny Shakespeare's 65 characters + 4 special tokens, for parameter counts


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: ModelKind
    description: str
    config: type[ModelConfig]
    cls: type[ZooModel]

    def default_config(self) -> ModelConfig:
        return self.config(name=self.name)

    def reference_params(self) -> int:
        """Parameters of the default config at the char-level Tiny Shakespeare vocabulary."""
        return count_parameters(build_model(self.default_config(), REFERENCE_VOCAB))


MODEL_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    name: str, *, config: type[ModelConfig], description: str, kind: ModelKind | None = None
) -> Callable[[type[ZooModel]], type[ZooModel]]:
    """Class decorator: make `name` buildable from a YAML `model:` section.

    The kind comes from the class (LanguageModel: "lm", Seq2SeqModel: "seq2seq"); `kind`, if given,
    must agree. The config class learns it too, so a config knows its kind without the registry.
    """

    def decorate(cls: type[ZooModel]) -> type[ZooModel]:
        if name in MODEL_REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        if kind is not None and kind != cls.kind:
            raise ValueError(f"model {name!r}: kind {kind!r} disagrees with its class ({cls.kind!r})")
        MODEL_REGISTRY[name] = ModelInfo(name, cls.kind, description, config, cls)  # type: ignore[arg-type]
        config.kind = cls.kind
        return cls

    return decorate


def get_model_info(name: str) -> ModelInfo:
    try:
        return MODEL_REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(MODEL_REGISTRY))
        raise ConfigError(f"unknown model {name!r}; known models: {known}") from None


def build_model(spec: ModelConfig | dict[str, Any], vocab_size: int | tuple[int, int]) -> ZooModel:
    """Instantiate a registered model from its config (or a plain dict) and vocabulary size(s)."""
    raw = spec if isinstance(spec, dict) else spec.model_dump()
    info = get_model_info(str(raw.get("name")))
    if not isinstance(spec, info.config):
        try:
            spec = info.config.model_validate(raw)
        except ValidationError as err:
            raise ConfigError(f"model: {describe(err, info.config, ('model',))}") from None
    try:
        return info.cls(spec, vocab_size)
    except ValueError as err:  # a config that only fails once the vocabulary is known
        raise ConfigError(f"model: {err}") from None


def tiny_model_config(name: str, **extra: Any) -> dict[str, Any]:
    """A `model:` section for family `name` at its tiny test size (the model's own `tiny_config`)."""
    return {**get_model_info(name).cls.tiny_config(), **extra, "name": name}


def list_models() -> list[ModelInfo]:
    return [MODEL_REGISTRY[name] for name in sorted(MODEL_REGISTRY)]


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    params = {id(p): p for p in model.parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in params.values())
