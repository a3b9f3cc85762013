"""The decoder-only GPT: masked multi-head self-attention blocks over learned or sinusoidal positions.

GPT: token embedding + positions (learned, or sinusoidal as in "Attention Is All You Need") ->
N blocks of masked multi-head self-attention and a position-wise feed-forward network, each with
a residual connection and LayerNorm (pre-LN by default, post-LN as in the original paper) ->
final norm -> output projection tied to the embedding.

Decoding keeps a KV cache per layer. When the text reaches the context length the window slides:
the oldest quarter is dropped and the cache rebuilt from the kept tokens, so generation continues
past the context at a constant amortised cost per token, never indexing out of range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import ValidationInfo, field_validator
from torch import nn

from lmzoo.config.schema import ModelConfig, PositiveInt, Probability
from lmzoo.models.attention import KVCache, MultiHeadAttention, StaticKVCache, sinusoidal_positions
from lmzoo.models.base import LanguageModel
from lmzoo.models.heads import OutputHead
from lmzoo.models.layers import FeedForward, dropout_layer, heads_divide_width
from lmzoo.models.registry import register_model
from lmzoo.models.static_decoding import StaticDecoding


class GPTConfig(ModelConfig):
    name: Literal["gpt"] = "gpt"
    d_model: PositiveInt = 128
    n_heads: PositiveInt = 4
    n_layers: PositiveInt = 4
    d_ff: PositiveInt | None = None  # feed-forward width; None = 4 * d_model
    context_length: PositiveInt = 64
    dropout: Probability = 0.0
    positions: Literal["learned", "sinusoidal"] = "learned"
    norm: Literal["pre", "post"] = "pre"
    activation: Literal["gelu", "relu"] = "gelu"
    bias: bool = True
    tie_weights: bool = True
    attention: Literal["sdpa", "explicit"] = "sdpa"  # explicit = the formula step by step (teaching, tests)

    @field_validator("n_heads")
    @classmethod
    def _heads_divide_width(cls, value: int, info: ValidationInfo) -> int:
        return heads_divide_width(value, info)

    @property
    def context_len(self) -> int | None:
        return self.context_length

    def check_run(self, run) -> None:
        if run.data.seq_len is not None and run.data.seq_len > self.context_length:
            raise ValueError(
                f"data.seq_len: {run.data.seq_len} is longer than model.context_length {self.context_length}; "
                "a model cannot train on sequences longer than its context"
            )


class DecoderBlock(nn.Module):
    """Masked self-attention and feed-forward, each wrapped in a residual connection and LayerNorm."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        d = config.d_model
        self.pre_norm = config.norm == "pre"
        self.norm1 = nn.LayerNorm(d, bias=config.bias)
        self.attn = MultiHeadAttention(
            d,
            config.n_heads,
            dropout=config.dropout,
            bias=config.bias,
            explicit=config.attention == "explicit",
        )
        self.attn_dropout = dropout_layer(config.dropout)
        self.norm2 = nn.LayerNorm(d, bias=config.bias)
        self.ff = FeedForward(d, config.d_ff or 4 * d, config.activation, config.bias, config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn_dropout(self.attn(self.norm1(x), causal=True, cache=cache))
            return x + self.ff(self.norm2(x))
        x = self.norm1(x + self.attn_dropout(self.attn(x, causal=True, cache=cache)))
        return self.norm2(x + self.ff(x))


@dataclass
class GPTState:
    """Decoding state: one KV cache per layer and the token ids currently in the window (B, L).

    `static`: fixed-shape caches (StaticKVCache) written at `position`; `compiled`: the one-token step
    of a static state runs torch.compile'd (CUDA graphs on CUDA).
    """

    caches: list[KVCache] | list[StaticKVCache] | None = None
    ids: torch.Tensor | None = None
    static: bool = False
    compiled: bool = False
    position: torch.Tensor | None = None  # static: (1,) long, the next slot to write

    @property
    def length(self) -> int:
        return 0 if self.ids is None else self.ids.shape[1]


@register_model(
    "gpt",
    config=GPTConfig,
    description="decoder-only Transformer LM (GPT): masked multi-head self-attention, KV-cache decoding",
)
class GPT(StaticDecoding, LanguageModel):
    carries_state = False
    keep_fraction = 0.75  # share of the context kept when the decoding window slides
    default_lora_targets = ("*attn.in_proj.weight", "*attn.out_proj.weight")

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {"d_model": 16, "n_heads": 2, "n_layers": 2, "d_ff": 32, "context_length": 32, "dropout": 0.0}

    def fsdp_units(self) -> set[type[nn.Module]]:
        return {DecoderBlock}

    def adapter_sites(self) -> list[tuple[str, int]]:
        return [(f"blocks.{index}.ff", self.config.d_model) for index in range(len(self.blocks))]

    def __init__(self, config: GPTConfig, vocab_size: int) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.token_embedding = nn.Embedding(vocab_size, d)
        if config.positions == "learned":
            self.position_embedding = nn.Embedding(config.context_length, d)
        else:
            self.register_buffer(
                "position_table", sinusoidal_positions(config.context_length, d), persistent=False
            )
        self.dropout = dropout_layer(config.dropout)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_layers))
        # Post-LN blocks already end in a LayerNorm; pre-LN needs one before the output layer.
        self.final_norm = nn.LayerNorm(d, bias=config.bias) if config.norm == "pre" else nn.Identity()
        self.head = OutputHead(d, vocab_size, bias=False)
        self._init_weights()
        if config.tie_weights:
            self.head.tie_to(self.token_embedding)

    def _init_weights(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers)."""
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif param.dim() >= 2:
                std = (
                    0.02 / math.sqrt(2 * self.config.n_layers)
                    if name.endswith(("out_proj.weight", "down.weight"))
                    else 0.02
                )
                nn.init.normal_(param, mean=0.0, std=std)

    @property
    def context_len(self) -> int:
        return self.config.context_length

    def init_state(self, batch_size: int) -> GPTState:
        return GPTState()

    def _embed(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device) + start  # start: an int or a (1,) tensor
        if self.config.positions == "learned":
            pos = self.position_embedding(positions)
        else:
            pos = self.position_table[positions]
        scale = math.sqrt(self.config.d_model) if self.config.positions == "sinusoidal" else 1.0
        return self.dropout(self.token_embedding(ids) * scale + pos)  # (B, T, d)

    def hidden(
        self, ids: torch.Tensor, state: GPTState | None = None
    ) -> tuple[torch.Tensor, GPTState | None]:
        batch, steps = ids.shape
        context = self.config.context_length
        if steps > context:  # with a state too: a sliding window would return fewer positions than given
            raise ValueError(f"sequence of {steps} tokens is longer than the context length {context}")
        if state is None:
            x = self._embed(ids, 0)
            for block in self.blocks:
                x = block(x)
            return self.final_norm(x), None
        if state.length + steps > context:
            return self._slide(ids, state)
        if state.caches is None:
            state.caches = self._new_caches(batch, state)
        if state.static:
            h = self.static_tokens(ids, state)
        else:
            x = self._embed(ids, state.length)
            for block, cache in zip(self.blocks, state.caches, strict=True):
                x = block(x, cache)
            h = self.final_norm(x)
        state.ids = ids if state.ids is None else torch.cat([state.ids, ids], dim=1)
        return h, state

    def _new_caches(self, batch: int, state: GPTState) -> list[KVCache] | list[StaticKVCache]:
        heads, context = self.config.n_heads, self.config.context_length
        if state.static:
            return self.static_caches(batch, state, heads, context, self.config.d_model // heads)
        like = self.token_embedding.weight
        return [KVCache(batch, heads, context, self.config.d_model // heads, like=like) for _ in self.blocks]

    def _slide(self, ids: torch.Tensor, state: GPTState) -> tuple[torch.Tensor, GPTState]:
        """Drop the oldest tokens, rebuild the cache from the kept window, return features of `ids`."""
        context = self.config.context_length
        history = ids if state.ids is None else torch.cat([state.ids, ids], dim=1)
        keep = min(context, max(ids.shape[1], int(context * self.keep_fraction)))
        window = history[:, -keep:]
        fresh = GPTState()
        if state.static:  # the same buffers (and captured graphs), written again from slot 0
            position = state.position.zero_() if state.position is not None else None
            fresh = GPTState(caches=state.caches, static=True, compiled=state.compiled, position=position)
        h, new_state = self.hidden(window, fresh)
        return h[:, -ids.shape[1] :], new_state
