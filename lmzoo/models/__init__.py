"""Registered model families. Imports are explicit: a reader sees every family that exists."""

from lmzoo.models import recurrent, seq2seq, transformer  # noqa: E402,F401  (rnn lstm gru; seq2seq; gpt transformer)
from lmzoo.models.registry import (
    MODEL_REGISTRY,
    ModelInfo,
    build_model,
    count_parameters,
    get_model_info,
    list_models,
    register_model,
)

__all__ = [
    "MODEL_REGISTRY",
    "ModelInfo",
    "build_model",
    "count_parameters",
    "get_model_info",
    "list_models",
    "register_model",
]
