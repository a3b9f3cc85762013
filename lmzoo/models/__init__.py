"""Registered model families: every module in this package that is not a building block is a family.

Families are found by listing the package, so a new family is one new file here and nothing else
(`lmzoo models` lists what registered). Today: recurrent (rnn, lstm, gru), seq2seq, gpt, transformer,
modern; see each module's docstring.
"""

import importlib
import pkgutil

from lmzoo.models.registry import (
    MODEL_REGISTRY,
    ModelInfo,
    build_model,
    count_parameters,
    get_model_info,
    list_models,
    register_model,
    tiny_model_config,
)

__all__ = [
    "MODEL_REGISTRY",
    "ModelInfo",
    "build_model",
    "count_parameters",
    "get_model_info",
    "list_models",
    "register_model",
    "tiny_model_config",
]

BUILDING_BLOCKS = {
    "attention",
    "base",
    "decoder",
    "heads",
    "layers",
    "registry",
}  # shared parts, not families

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in BUILDING_BLOCKS:
        importlib.import_module(f"{__name__}.{_module}")
