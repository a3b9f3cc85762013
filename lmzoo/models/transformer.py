"""The original encoder-decoder Transformer ("Attention Is All You Need").

Transformer (encoder-decoder): embeddings scaled by sqrt(d) plus sinusoidal positions -> N encoder
layers (self-attention over the source with its padding mask, feed-forward) -> N decoder layers
(masked self-attention, cross-attention over the encoder output, feed-forward), residual + LayerNorm
around each sub-layer (post-LN as in the paper by default) -> output projection. Decoding caches the
decoder's self-attention keys/values and projects the encoder output for cross-attention once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from pydantic import ValidationInfo, field_validator
from torch import nn

from lmzoo.config.schema import ModelConfig, PositiveInt, Probability, RunConfig
from lmzoo.models.attention import KVCache, MultiHeadAttention, StaticKVCache, sinusoidal_positions
from lmzoo.models.base import DecodingSlots, Seq2SeqModel, seq2seq_vocab_sizes
from lmzoo.models.heads import OutputHead
from lmzoo.models.layers import FeedForward, dropout_layer, heads_divide_width, positions_from
from lmzoo.models.registry import register_model


class TransformerConfig(ModelConfig):
    name: Literal["transformer"] = "transformer"
    d_model: PositiveInt = 512
    n_heads: PositiveInt = 8
    n_encoder_layers: PositiveInt = 6
    n_decoder_layers: PositiveInt = 6
    d_ff: PositiveInt = 2048
    dropout: Probability = 0.1
    max_len: PositiveInt = 128  # longest source or target (positions table, decoding cache)
    norm: Literal["pre", "post"] = "post"
    activation: Literal["gelu", "relu"] = "relu"
    share_embeddings: bool = True  # one embedding for source and target (needs one shared tokenizer)
    tie_weights: bool = True  # output layer shares the target embedding
    attention: Literal["sdpa", "explicit"] = "sdpa"

    @field_validator("n_heads")
    @classmethod
    def _heads_divide_width(cls, value: int, info: ValidationInfo) -> int:
        return heads_divide_width(value, info)

    def check_run(self, run: RunConfig) -> None:
        if self.share_embeddings and run.target_tokenizer is not None:
            raise ValueError(
                "model.share_embeddings: needs one tokenizer for both sides (remove target_tokenizer)"
            )
        if run.data.max_len > self.max_len:
            raise ValueError(f"data.max_len: {run.data.max_len} is longer than model.max_len {self.max_len}")


class SublayerNorm(nn.Module):
    """Residual + LayerNorm around a sub-layer: pre-LN x + f(norm(x)), or post-LN norm(x + f(x))."""

    def __init__(self, d_model: int, pre: bool, dropout: float) -> None:
        super().__init__()
        self.norm, self.pre, self.dropout = nn.LayerNorm(d_model), pre, dropout_layer(dropout)

    def forward(self, x: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.pre:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        pre, d = config.norm == "pre", config.d_model
        self.self_attn = MultiHeadAttention(
            d, config.n_heads, dropout=config.dropout, explicit=config.attention == "explicit"
        )
        self.ff = FeedForward(d, config.d_ff, config.activation, True, 0.0)
        self.sub1, self.sub2 = SublayerNorm(d, pre, config.dropout), SublayerNorm(d, pre, config.dropout)

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        x = self.sub1(x, lambda h: self.self_attn(h, key_padding_mask=src_mask))
        return self.sub2(x, self.ff)


class DecoderLayer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        pre, d, explicit = config.norm == "pre", config.d_model, config.attention == "explicit"
        self.self_attn = MultiHeadAttention(d, config.n_heads, dropout=config.dropout, explicit=explicit)
        self.cross_attn = MultiHeadAttention(d, config.n_heads, dropout=config.dropout, explicit=explicit)
        self.ff = FeedForward(d, config.d_ff, config.activation, True, 0.0)
        self.sub1, self.sub2, self.sub3 = (SublayerNorm(d, pre, config.dropout) for _ in range(3))

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        src_mask: torch.Tensor,
        cache: KVCache | StaticKVCache | None = None,
    ) -> torch.Tensor:
        x = self.sub1(x, lambda h: self.self_attn(h, causal=True, cache=cache))
        x = self.sub2(x, lambda h: self.cross_attn(h, memory, key_padding_mask=src_mask))
        return self.sub3(x, self.ff)


@dataclass
class EncoderDecoderState:
    """Decoding state: per decoder layer a self-attention KV cache and the projected encoder K/V."""

    caches: list[KVCache]
    cross: list[tuple[torch.Tensor, torch.Tensor]]
    length: int = 0


@register_model(
    "transformer",
    config=TransformerConfig,
    description="encoder-decoder Transformer (Vaswani et al.): sinusoidal positions, masked and cross attention",
)
class EncoderDecoderTransformer(Seq2SeqModel):
    position_table: torch.Tensor  # (max_len, d) buffer
    default_lora_targets = ("*attn.in_proj.weight", "*attn.out_proj.weight")

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {
            "d_model": 16,
            "n_heads": 2,
            "n_encoder_layers": 2,
            "n_decoder_layers": 2,
            "d_ff": 32,
            "max_len": 32,
            "dropout": 0.0,
        }

    @property
    def max_source_len(self) -> int:
        return self.config.max_len

    def fsdp_units(self) -> set[type[nn.Module]]:
        return {EncoderLayer, DecoderLayer}

    def adapter_sites(self) -> list[tuple[str, int]]:
        d = self.config.d_model
        return [
            (f"{stack}.{index}.ff", d)
            for stack in ("encoder_layers", "decoder_layers")
            for index in range(len(getattr(self, stack)))
        ]

    def __init__(self, config: TransformerConfig, vocab_size: int | tuple[int, int]) -> None:
        super().__init__()
        self.config = config
        src_vocab, tgt_vocab = seq2seq_vocab_sizes(vocab_size, config.share_embeddings)
        d = config.d_model
        self.src_embedding = nn.Embedding(src_vocab, d, padding_idx=0)
        self.tgt_embedding = (
            self.src_embedding if config.share_embeddings else nn.Embedding(tgt_vocab, d, padding_idx=0)
        )
        self.register_buffer("position_table", sinusoidal_positions(config.max_len, d), persistent=False)
        self.dropout = dropout_layer(config.dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_decoder_layers))
        pre = config.norm == "pre"
        self.encoder_norm = nn.LayerNorm(d) if pre else nn.Identity()
        self.decoder_norm = nn.LayerNorm(d) if pre else nn.Identity()
        self.head = OutputHead(d, tgt_vocab, bias=False)
        for name, param in self.named_parameters():
            if param.dim() >= 2 and "embedding" not in name:
                nn.init.xavier_uniform_(param)
        nn.init.normal_(self.src_embedding.weight, std=d**-0.5)
        if not config.share_embeddings:
            nn.init.normal_(self.tgt_embedding.weight, std=d**-0.5)
        if config.tie_weights:
            self.head.tie_to(self.tgt_embedding)

    def _embed(self, embedding: nn.Embedding, ids: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """Scaled embeddings plus the positions from `start` (an int, or (B,) per row in batched decoding)."""
        last = int(start.max()) if isinstance(start, torch.Tensor) else start
        if last + ids.shape[1] > self.config.max_len:
            raise ValueError(f"sequence longer than model.max_len {self.config.max_len}")
        pos = self.position_table[positions_from(start, ids.shape[1], ids.device)]  # (T, d) or (B, T, d)
        return self.dropout(embedding(ids) * math.sqrt(self.config.d_model) + pos)  # (B, T, d)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        x = self._embed(self.src_embedding, src, 0)  # (B, S, d)
        for layer in self.encoder_layers:
            x = layer(x, src_mask)
        return self.encoder_norm(x)  # memory (B, S, d)

    def init_decode_state(self, memory: torch.Tensor, src_mask: torch.Tensor) -> EncoderDecoderState:
        batch, heads = memory.shape[0], self.config.n_heads
        d_head = self.config.d_model // heads
        return EncoderDecoderState(
            caches=[
                KVCache(batch, heads, self.config.max_len, d_head, like=memory) for _ in self.decoder_layers
            ],
            cross=[cast(DecoderLayer, layer).cross_attn.project_kv(memory) for layer in self.decoder_layers],
        )

    def decoding_slots(self, capacity: int) -> TransformerSlots:
        return TransformerSlots(self, capacity)

    def reorder_state(self, state: EncoderDecoderState, indices: torch.Tensor) -> EncoderDecoderState:
        return EncoderDecoderState(
            caches=[cache.select(indices) for cache in state.caches],
            cross=[(k.index_select(0, indices), v.index_select(0, indices)) for k, v in state.cross],
            length=state.length,
        )

    def decode_hidden(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        src_mask: torch.Tensor,
        state: EncoderDecoderState | None = None,
    ) -> tuple[torch.Tensor, EncoderDecoderState | None]:
        x = self._embed(self.tgt_embedding, tgt, state.length if state is not None else 0)  # (B, T, d)
        if state is None:
            return self.decoder_layers_over(x, [memory] * len(self.decoder_layers), src_mask), None
        x = self.decoder_layers_over(x, state.cross, src_mask, state.caches)
        state.length += tgt.shape[1]
        return x, state

    def decoder_layers_over(
        self,
        x: torch.Tensor,
        memories: list[Any],
        src_mask: torch.Tensor,
        caches: list[KVCache] | list[StaticKVCache] | None = None,
    ) -> torch.Tensor:
        """Target features (B, T, d) through the decoder layers (each with its memory, or projected K/V,
        and its self-attention cache) and the final norm."""
        for index, layer in enumerate(self.decoder_layers):
            x = layer(x, memories[index], src_mask, cache=None if caches is None else caches[index])
        return self.decoder_norm(x)  # (B, T, d)


class TransformerSlots(DecodingSlots):
    """Batched decoding rows of the encoder-decoder Transformer: per decoder layer a self-attention
    `StaticKVCache` with per-row positions, and each row's projected encoder K/V and source mask."""

    def __init__(self, model: EncoderDecoderTransformer, capacity: int) -> None:
        from lmzoo.models.seq2seq import SourceRows

        super().__init__(capacity)
        config, like = model.config, model.tgt_embedding.weight
        self.model, self.sources = model, SourceRows(capacity)
        self.position = torch.zeros(capacity, dtype=torch.long, device=like.device)
        shape = (capacity, config.n_heads, config.max_len, config.d_model // config.n_heads)
        self.caches = [StaticKVCache(*shape, like=like, position=self.position) for _ in model.decoder_layers]
        self.lengths = [0] * capacity

    prefill = "padded"  # the source's padding is masked in the encoder and in cross-attention

    def put(self, row: int, single: Any, index: int, length: int) -> None:
        _, src_mask, state = single
        own = slice(index, index + 1)
        self.sources.put(row, [t[own] for pair in state.cross for t in pair], src_mask[own], dim=2)
        for cache, source in zip(self.caches, state.caches, strict=True):
            cache.k[row, :, :length] = source.k[index, :, :length]
            cache.v[row, :, :length] = source.v[index, :, :length]
        self.position[row], self.lengths[row] = length, length

    def move(self, source: int, target: int) -> None:
        self.sources.move(source, target)
        length = self.lengths[source]
        for cache in self.caches:
            cache.k[target, :, :length] = cache.k[source, :, :length]
            cache.v[target, :, :length] = cache.v[source, :, :length]
        self.position[target], self.lengths[target] = length, length

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        count = len(tokens)
        cross, src_mask = self.sources.rows(count, dim=2)
        pairs = [(cross[i], cross[i + 1]) for i in range(0, len(cross), 2)]
        span = max(self.lengths[:count]) + 1
        first = self.caches[0].rows(count, span)
        views = [first] + [cache.rows(count, span, like=first) for cache in self.caches[1:]]
        x = self.model._embed(self.model.tgt_embedding, tokens[:, None], self.position[:count])  # (n, 1, d)
        h = self.model.decoder_layers_over(x, pairs, src_mask, views)  # (n, 1, d)
        self.position[:count] += 1
        for row in range(count):
            self.lengths[row] += 1
        return h[:, 0]
