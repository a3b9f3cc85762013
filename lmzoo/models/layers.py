"""Transformer building blocks shared by the gpt, modern and transformer families: the position-wise
feed-forward network and its activations, dropout that vanishes at p = 0, and the heads-divide-width check."""

from __future__ import annotations

import torch
from pydantic import ValidationInfo
from torch import nn


def heads_divide_width(heads: int, info: ValidationInfo) -> int:
    """Multi-head attention splits d_model into equal heads."""
    width = info.data.get("d_model")
    if width is not None and width % heads:
        raise ValueError(f"n_heads ({heads}) must divide d_model ({width})")
    return heads


def dropout_layer(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


def activation_layer(name: str) -> nn.Module:
    """gelu (exact), gelu_tanh (GPT-2's tanh approximation of GELU) or relu."""
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    return nn.GELU() if name == "gelu" else nn.ReLU()


class FeedForward(nn.Module):
    """Position-wise feed-forward network: Linear -> activation -> Linear."""

    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.act = activation_layer(activation)
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = dropout_layer(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.act(self.up(x))))


def positions_from(start: int | torch.Tensor, steps: int, device: torch.device) -> torch.Tensor:
    """Positions start, start + 1, ... of `steps` tokens: (T,) for an int or a (1,) tensor, (B, T) for
    a (B,) tensor of per-row starts (batched decoding, each row at its own length)."""
    offsets = torch.arange(steps, device=device)
    if isinstance(start, torch.Tensor) and start.numel() > 1:
        return start[:, None] + offsets  # (B, T)
    return offsets + start  # (T,)
