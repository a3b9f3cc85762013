"""Recurrent language models: vanilla (Elman) RNN, LSTM and GRU.

All three share one shape: embedding -> stacked recurrent layers with dropout -> optional MLP
head -> output projection (full or adaptive softmax, optionally tied to the embedding).
Each layer is its own module so that fine-tuning can reach every layer's matrices.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn

from lmzoo.config.schema import ModelConfig, PositiveInt, Probability, RunConfig
from lmzoo.models.base import DecodingSlots, LanguageModel, map_tensors
from lmzoo.models.heads import OutputHead
from lmzoo.models.registry import register_model

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class RecurrentConfig(ModelConfig):
    """Options shared by rnn / lstm / gru."""

    embedding_dim: PositiveInt = 128
    hidden_size: PositiveInt = 256
    num_layers: PositiveInt = 2
    dropout: Probability = 0.2  # on embeddings, between layers and before the head
    head_sizes: list[PositiveInt] = []  # hidden widths of an optional MLP before the output layer
    head_activation: Literal["relu", "tanh", "gelu"] = "relu"
    tie_weights: bool = False  # share the output matrix with the embedding
    softmax: Literal["full", "adaptive"] = "full"
    adaptive_cutoffs: list[PositiveInt] = [2000, 10000]  # word-rank boundaries of the adaptive clusters
    adaptive_div_value: Annotated[float, Field(gt=1)] = 4.0

    def check_run(self, run: RunConfig) -> None:
        if self.softmax == "adaptive" and run.train.label_smoothing:
            raise ValueError(
                "train.label_smoothing: needs model.softmax: full (an adaptive softmax scores only "
                "the target token)"
            )


class RNNConfig(RecurrentConfig):
    name: Literal["rnn"] = "rnn"
    nonlinearity: Literal["tanh", "relu"] = "tanh"


class LSTMConfig(RecurrentConfig):
    name: Literal["lstm"] = "lstm"


class GRUConfig(RecurrentConfig):
    name: Literal["gru"] = "gru"


class ElmanRNN(nn.Module):
    """One vanilla RNN layer, written as the formula: h_t = act(W_x x_t + W_h h_{t-1} + b).

    The input projection W_x x_t does not depend on h, so it is computed for all t in one matmul;
    only the recurrent part loops over time.
    """

    def __init__(self, input_size: int, hidden_size: int, nonlinearity: str = "tanh") -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size))  # W_x
        self.weight_hh = nn.Parameter(torch.empty(hidden_size, hidden_size))  # W_h
        self.bias = nn.Parameter(torch.empty(hidden_size))  # b
        self.act = torch.tanh if nonlinearity == "tanh" else torch.relu
        bound = 1.0 / math.sqrt(hidden_size)
        for weight in (self.weight_ih, self.weight_hh, self.bias):
            nn.init.uniform_(weight, -bound, bound)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        batch, steps, _ = x.shape
        if h is None:
            h = x.new_zeros(batch, self.hidden_size)
        x_proj = torch.nn.functional.linear(x, self.weight_ih, self.bias)  # (B, T, H)
        outputs = []
        for t in range(steps):
            h = self.act(x_proj[:, t] + h @ self.weight_hh.T)  # (B, H)
            outputs.append(h)
        return torch.stack(outputs, dim=1), h  # (B, T, H), (B, H)

    def recurrent_flops_per_token(self) -> float:
        """W_x x_t and W_h h_{t-1}: 2 * H * (I + H) (read by ZooModel.flops_per_token)."""
        return 2.0 * self.hidden_size * (self.weight_ih.shape[1] + self.hidden_size)


class RecurrentLM(LanguageModel):
    """Embedding -> recurrent layers -> optional MLP head -> output layer."""

    carries_state = True
    default_lora_targets = ("*weight_ih*", "*weight_hh*")

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"embedding_dim": 8, "hidden_size": 16, "num_layers": 2, "dropout": 0.0}

    def __init__(self, config: RecurrentConfig, vocab_size: int) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(vocab_size, config.embedding_dim)
        self.dropout = nn.Dropout(config.dropout)
        sizes = [config.embedding_dim] + [config.hidden_size] * config.num_layers
        self.layers = nn.ModuleList(self.make_layer(i, o) for i, o in zip(sizes[:-1], sizes[1:], strict=True))
        mlp: list[nn.Module] = []
        width = config.hidden_size
        for size in config.head_sizes:
            mlp += [nn.Linear(width, size), ACTIVATIONS[config.head_activation]()]
            width = size
        if config.tie_weights and width != config.embedding_dim:
            mlp.append(nn.Linear(width, config.embedding_dim, bias=False))  # lets tied sizes differ
            width = config.embedding_dim
        self.mlp = nn.Sequential(*mlp)
        cutoffs = config.adaptive_cutoffs if config.softmax == "adaptive" else None
        self.head = OutputHead(
            width, vocab_size, adaptive_cutoffs=cutoffs, div_value=config.adaptive_div_value
        )
        if config.tie_weights:
            self.head.tie_to(self.embedding)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)

    def make_layer(self, input_size: int, hidden_size: int) -> nn.Module:
        raise NotImplementedError

    def adapter_sites(self) -> list[tuple[str, int]]:
        return [(f"layers.{index}", self.config.hidden_size) for index in range(len(self.layers))]

    def decoding_slots(self, capacity: int) -> RecurrentSlots:
        return RecurrentSlots(self, capacity)

    def hidden(self, ids: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, list[Any]]:
        x = self.dropout(self.embedding(ids))  # (B, T, E)
        new_state = []
        for index, layer in enumerate(self.layers):
            x, layer_state = layer(x, None if state is None else state[index])  # (B, T, H)
            new_state.append(layer_state)
            x = self.dropout(x)
        return self.mlp(x), new_state  # (B, T, C)


def batch_dim(state: torch.Tensor) -> int:
    """Where the batch is in a recurrent layer's state: (layers, B, H) for torch's LSTM/GRU, (B, H) for
    the Elman layer."""
    return 1 if state.dim() == 3 else 0


class RecurrentSlots(DecodingSlots):
    """Batched decoding rows of a recurrent LM: every layer's hidden state (and LSTM cell) with room for
    `capacity` sequences; a step runs the active rows' block through the layers as one batch."""

    def __init__(self, model: RecurrentLM, capacity: int) -> None:
        super().__init__(capacity)
        self.model = model
        self.states: list[Any] | None = None  # shaped on the first sequence taken in

    def _rows(self, count: int) -> list[Any]:
        """Views of the first `count` rows of every layer's state (writes land in the buffers)."""
        assert self.states is not None
        return map_tensors(lambda t: t.narrow(batch_dim(t), 0, count), self.states)

    def put(self, row: int, single: list[Any], index: int, length: int) -> None:
        if self.states is None:

            def room(t: torch.Tensor) -> torch.Tensor:
                shape = list(t.shape)
                shape[batch_dim(t)] = self.capacity
                return t.new_zeros(shape)

            self.states = map_tensors(room, single)
        for target, source in zip(_tensors(self.states), _tensors(single), strict=True):
            target.select(batch_dim(target), row).copy_(source.select(batch_dim(source), index))

    def move(self, source: int, target: int) -> None:
        for t in _tensors(self.states):
            t.select(batch_dim(t), target).copy_(t.select(batch_dim(t), source))

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Features (n, C) of each active row's next token (n,)."""
        views = self._rows(len(tokens))
        h, new = self.model.hidden(tokens[:, None], views)  # (n, 1, C)
        for view, value in zip(_tensors(views), _tensors(new), strict=True):
            view.copy_(value)
        return h[:, 0]


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor inside nested lists/tuples, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for item in value for t in _tensors(item)]


@register_model(
    "rnn",
    config=RNNConfig,
    description="vanilla (Elman) RNN LM: h_t = tanh(W_x x_t + W_h h_{t-1} + b), y_t = W_y h_t",
)
class RNNLM(RecurrentLM):
    def make_layer(self, input_size: int, hidden_size: int) -> nn.Module:
        return ElmanRNN(input_size, hidden_size, self.config.nonlinearity)  # type: ignore[attr-defined]


@register_model(
    "lstm", config=LSTMConfig, description="LSTM language model (stacked, dropout, optional tying)"
)
class LSTMLM(RecurrentLM):
    def make_layer(self, input_size: int, hidden_size: int) -> nn.Module:
        return nn.LSTM(input_size, hidden_size, batch_first=True)


@register_model("gru", config=GRUConfig, description="GRU language model (stacked, dropout, optional tying)")
class GRULM(RecurrentLM):
    def make_layer(self, input_size: int, hidden_size: int) -> nn.Module:
        return nn.GRU(input_size, hidden_size, batch_first=True)
