"""A toy model family defined outside lmzoo: the proof that the model contract is all lmzoo needs.

The causal bag-of-embeddings LM: h_t = tanh(W · mean(e_1 .. e_t)). Its decoding state is the running
sum and count, so each new token costs the same however long the text is. `register()` adds it to
the registry; run as a script (`python tests/toy_family.py train cfg.yaml`) it registers the family
and runs the lmzoo CLI, which is how a torchrun worker gets it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lmzoo.config.schema import ModelConfig, PositiveInt
from lmzoo.models.base import LanguageModel
from lmzoo.models.heads import OutputHead
from lmzoo.models.registry import MODEL_REGISTRY, register_model

NAME = "toybag"


class BagConfig(ModelConfig):
    name: Literal["toybag"] = "toybag"
    d_model: PositiveInt = 16


@dataclass
class BagState:
    total: torch.Tensor | None = None  # (B, d): sum of the embeddings so far
    count: int = 0


class BagLM(LanguageModel):
    """Mean of the embeddings so far -> linear -> tanh -> output layer."""

    carries_state = False
    default_lora_targets = ("mix.weight",)

    def __init__(self, config: BagConfig, vocab_size: int) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(vocab_size, config.d_model)
        self.mix = nn.Linear(config.d_model, config.d_model)
        self.head = OutputHead(config.d_model, vocab_size)

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"d_model": 8}

    def adapter_sites(self) -> list[tuple[str, int]]:
        return [("mix", self.config.d_model)]

    def init_state(self, batch_size: int) -> BagState:
        return BagState()

    def hidden(
        self, ids: torch.Tensor, state: BagState | None = None
    ) -> tuple[torch.Tensor, BagState | None]:
        x = self.embedding(ids)  # (B, T, d)
        start = state.total if state is not None and state.total is not None else x.new_zeros(x[:, 0].shape)
        seen = state.count if state is not None else 0
        totals = x.cumsum(dim=1) + start[:, None]  # (B, T, d)
        counts = torch.arange(seen + 1, seen + ids.shape[1] + 1, device=ids.device)[None, :, None]
        h = torch.tanh(self.mix(totals / counts))  # (B, T, d)
        new_state = None if state is None else BagState(totals[:, -1], seen + ids.shape[1])
        return h, new_state


def register() -> None:
    if NAME not in MODEL_REGISTRY:
        register_model(NAME, config=BagConfig, description="toy: causal bag of embeddings")(BagLM)


def unregister() -> None:
    MODEL_REGISTRY.pop(NAME, None)


if __name__ == "__main__":
    register()
    from lmzoo.cli import main

    main()
