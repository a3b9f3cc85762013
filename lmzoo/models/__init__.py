"""Registered model families, imported by name below (timm-style): a new family is one new file in this
package and one line here; `lmzoo models` lists what registered.

Families: recurrent (rnn, lstm, gru), seq2seq, transformer, gpt, modern (see each module's docstring).
Building blocks shared by them: base (the contract), registry, attention, layers, heads, decoder (the
shell of gpt and modern), peft (LoRA and adapters as module transforms).
"""

from lmzoo.models import gpt, modern, recurrent, seq2seq, transformer  # noqa: F401  (they register)
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
