"""The decoder-only GPT: masked multi-head self-attention blocks over learned or sinusoidal positions.

GPT: token embedding + positions (learned, or sinusoidal as in "Attention Is All You Need") ->
N blocks of masked multi-head self-attention and a position-wise feed-forward network, each with
a residual connection and LayerNorm (pre-LN by default, post-LN as in the original paper) ->
final norm -> output projection tied to the embedding.

Positions enter once, added to the input embedding (`embed`); attention itself is position-blind.
Decoding (KV cache, the window sliding past the context, the static cache and its compiled step) is
the decoder shell's, lmzoo.models.decoder.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from lmzoo.config.schema import PositiveFloat, PositiveInt
from lmzoo.models.attention import KVCache, MultiHeadAttention, StaticKVCache, sinusoidal_positions
from lmzoo.models.decoder import DecoderConfig, DecoderLM
from lmzoo.models.layers import FeedForward, dropout_layer, positions_from
from lmzoo.models.registry import register_model


class GPTConfig(DecoderConfig):
    name: Literal["gpt"] = "gpt"
    d_ff: PositiveInt | None = None  # feed-forward width; None = 4 * d_model
    positions: Literal["learned", "sinusoidal"] = "learned"
    norm: Literal["pre", "post"] = "pre"
    activation: Literal["gelu", "gelu_tanh", "relu"] = "gelu"  # gelu_tanh: GPT-2's tanh approximation
    bias: bool = True  # biases in attention, feed-forward and LayerNorms (GPT-2 has them)
    norm_eps: PositiveFloat = 1e-5  # LayerNorm epsilon


class DecoderBlock(nn.Module):
    """Masked self-attention and feed-forward, each wrapped in a residual connection and LayerNorm."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        d = config.d_model
        self.pre_norm = config.norm == "pre"
        self.norm1 = nn.LayerNorm(d, eps=config.norm_eps, bias=config.bias)
        self.attn = MultiHeadAttention(
            d,
            config.n_heads,
            dropout=config.dropout,
            bias=config.bias,
            explicit=config.attention == "explicit",
        )
        self.attn_dropout = dropout_layer(config.dropout)
        self.norm2 = nn.LayerNorm(d, eps=config.norm_eps, bias=config.bias)
        self.ff = FeedForward(d, config.d_ff or 4 * d, config.activation, config.bias, config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | StaticKVCache | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); with a cache, x continues the cached text."""
        if self.pre_norm:
            x = x + self.attn_dropout(self.attn(self.norm1(x), causal=True, cache=cache))  # (B, T, C)
            return x + self.ff(self.norm2(x))  # (B, T, C)
        x = self.norm1(x + self.attn_dropout(self.attn(x, causal=True, cache=cache)))  # (B, T, C)
        return self.norm2(x + self.ff(x))  # (B, T, C)


@register_model(
    "gpt",
    config=GPTConfig,
    description="decoder-only Transformer LM (GPT): masked multi-head self-attention, KV-cache decoding",
)
class GPT(DecoderLM):
    position_table: torch.Tensor  # (context, C) buffer, sinusoidal positions
    block_type = DecoderBlock
    residual_projections = ("out_proj.weight", "down.weight")
    default_lora_targets = ("*attn.in_proj.weight", "*attn.out_proj.weight")
    config: GPTConfig

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"d_model": 16, "n_heads": 2, "n_layers": 2, "d_ff": 32, "context_length": 32, "dropout": 0.0}

    def add_positions(self) -> None:
        """A learned position embedding, or the fixed sinusoidal table (a buffer, not saved)."""
        context, d = self.config.context_length, self.config.d_model
        if self.config.positions == "learned":
            self.position_embedding = nn.Embedding(context, d)
        else:
            self.register_buffer("position_table", sinusoidal_positions(context, d), persistent=False)

    def make_final_norm(self) -> nn.Module:
        # Post-LN blocks already end in a LayerNorm; pre-LN needs one before the output layer.
        pre = self.config.norm == "pre"
        config = self.config
        return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias) if pre else nn.Identity()

    def embed(self, ids: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """Token embedding plus the positions start, start + 1, ... (the sinusoidal variant scales the
        embedding by sqrt(d) first, as in the paper, so the table does not drown it)."""
        positions = positions_from(start, ids.shape[1], ids.device)  # (T,), or (B, T) per row
        if self.config.positions == "learned":
            pos = self.position_embedding(positions)  # (T, C) or (B, T, C)
        else:
            pos = self.position_table[positions]  # (T, C) or (B, T, C)
        scale = math.sqrt(self.config.d_model) if self.config.positions == "sinusoidal" else 1.0
        return self.token_embedding(ids) * scale + pos  # (B, T, C)
