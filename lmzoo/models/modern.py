"""The modern decoder: a decoder-only LM in the style of LLaMA and its successors.

It is GPT with the components that replaced the 2018 ones:

- RoPE, rotary position embeddings (Su et al., 2021, "RoFormer"): no position table is added to
  the input; each head's query and key are rotated pairwise by angles proportional to their
  position, so a score q_m . k_n depends only on the offset m - n.
- RMSNorm (Zhang & Sennrich, 2019): x / sqrt(mean(x^2) + eps) * g, LayerNorm without centring
  or bias, in pre-norm blocks and once before the output layer.
- SwiGLU feed-forward (Shazeer, 2020, "GLU Variants Improve Transformer"):
  down(silu(gate(x)) * up(x)), with hidden width 8/3 * d_model (rounded up to a multiple of
  `ff_multiple_of`) so its three matrices cost what a 4 * d_model two-matrix MLP does.
- Grouped-query attention (Ainslie et al., 2023, "GQA"): `n_kv_heads` key/value heads shared by
  groups of query heads, a smaller KV cache; n_kv_heads = n_heads is multi-head attention,
  n_kv_heads = 1 multi-query attention.
- Optional QK-norm: RMSNorm on each head's query and key before the rotation, which keeps
  attention logits bounded at high learning rates.
- No biases by default (Qwen2's query/key/value biases are a switch); output layer tied to the embedding
  by default.

The switches that make it Llama, Mistral, Qwen2 or Qwen3 (`rope_pairs`, `qkv_bias`, `qk_norm`,
`head_width`, `norm_eps`, `rope_base`, `tie_weights`) are what lmzoo.interop maps a Hugging Face
checkpoint onto.

Positions enter inside attention only: the shell hands every block the rotary embedding
(`block_inputs`), and attention rotates q and k at its cache's position, an int for the dynamic cache
or the device tensor a static cache shares. Decoding is the decoder shell's (lmzoo.models.decoder): the
KV cache holds the K/V of the n_kv_heads, already rotated; the window slides past the context like
GPT's, and the static cache with its compiled one-token step works the same way.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import ValidationInfo, field_validator
from torch import nn

from lmzoo.config.schema import PositiveFloat, PositiveInt
from lmzoo.models.attention import KVCache, RecordsAttention, StaticKVCache, fused_attention
from lmzoo.models.decoder import DecoderConfig, DecoderLM
from lmzoo.models.layers import dropout_layer, positions_from
from lmzoo.models.registry import register_model


def swiglu_hidden_size(d_model: int, multiple_of: int) -> int:
    """round(8/3 * d_model), rounded up to a multiple of `multiple_of` (128 -> 352 with 32)."""
    hidden = round(8 * d_model / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


class ModernConfig(DecoderConfig):
    name: Literal["modern"] = "modern"
    n_kv_heads: PositiveInt | None = None  # key/value heads (GQA); None = n_heads (multi-head attention)
    d_ff: PositiveInt | None = None  # SwiGLU hidden width; None = 8/3 * d_model rounded up to ff_multiple_of
    ff_multiple_of: PositiveInt = 32
    rope_base: PositiveFloat = 10000.0
    # which coordinates RoPE rotates together: (x_2i, x_2i+1) as in RoFormer and Meta's LLaMA code, or
    # (x_i, x_i+d/2) as in Hugging Face's Llama, Mistral and Qwen (the same model up to a permutation)
    rope_pairs: Literal["interleaved", "halves"] = "interleaved"
    # Llama 3.1's stretched RoPE frequencies for long contexts: (factor, low_freq_factor, high_freq_factor,
    # original context), e.g. (32, 1, 4, 8192) for Llama 3.2; None: plain RoPE
    rope_llama3: tuple[PositiveFloat, PositiveFloat, PositiveFloat, PositiveInt] | None = None
    norm_eps: PositiveFloat = 1e-5  # RMSNorm epsilon
    qk_norm: bool = False  # RMSNorm on each head's query and key before RoPE (Qwen3)
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    head_width: PositiveInt | None = None  # width of one attention head; None = d_model / n_heads

    @field_validator("head_width")
    @classmethod
    def _head_width_even(cls, value: int | None) -> int | None:
        if value is not None and value % 2:
            raise ValueError(f"{value} must be even (RoPE rotates pairs)")
        return value

    @field_validator("n_heads")
    @classmethod
    def _head_width_is_even(cls, value: int, info: ValidationInfo) -> int:
        width = info.data.get("d_model")  # (that heads divide the width is DecoderConfig's check)
        if width is not None and width % value == 0 and (width // value) % 2:
            raise ValueError(
                f"head width d_model / n_heads = {width // value} must be even (RoPE rotates pairs)"
            )
        return value

    @field_validator("n_kv_heads")
    @classmethod
    def _kv_heads_divide_heads(cls, value: int | None, info: ValidationInfo) -> int | None:
        heads = info.data.get("n_heads")
        if value is not None and heads is not None and heads % value:
            raise ValueError(f"n_kv_heads ({value}) must divide n_heads ({heads})")
        return value

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.head_width or self.d_model // self.n_heads

    @property
    def ff_hidden(self) -> int:
        return self.d_ff or swiglu_hidden_size(self.d_model, self.ff_multiple_of)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension; no centring, no bias."""

    def __init__(self, width: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # the mean of squares in float32, also under bf16 autocast
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., C)
        return normed.type_as(x) * self.weight


class RotaryEmbedding(nn.Module):
    """RoPE: rotate each pair (x_2i, x_2i+1) of a head by the angle pos * base^(-2i/d).

    A rotation by angle a(m) of q and a(n) of k leaves q . k depending on m - n only, so attention
    sees relative positions without a position table. cos/sin are precomputed for the context.
    `pairs="halves"` pairs x_i with x_i+d/2 instead (Hugging Face's layout of the same rotation).
    """

    cos: torch.Tensor  # (context, d/2) buffers
    sin: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        max_len: int,
        base: float = 10000.0,
        pairs: str = "interleaved",
        llama3: tuple[float, float, float, int] | None = None,
    ) -> None:
        super().__init__()
        self.halves = pairs == "halves"
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (d/2,)
        if llama3 is not None:
            inv_freq = llama3_frequencies(inv_freq, *llama3)
        angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (L, d/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        """x (B, H, T, d) at positions start .. start+T-1, rotated; same dtype as x. `start` is an int,
        a (1,) device tensor (a static cache's position, so a compiled step reads no Python int), or a
        (B,) tensor of per-row positions (batched decoding)."""
        positions = positions_from(start, x.shape[-2], x.device)  # (T,), or (B, T) per row
        cos, sin = self.cos[positions], self.sin[positions]  # (T, d/2), or (B, T, d/2)
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, d/2): one rotation per row, every head
        if self.halves:
            first, second = x.float().chunk(2, dim=-1)  # (B, H, T, d/2) each
            halves = [first * cos - second * sin, second * cos + first * sin]
            return torch.cat(halves, dim=-1).type_as(x)  # (B, H, T, d)
        pairs = x.float().unflatten(-1, (-1, 2))  # (B, H, T, d/2, 2)
        even, odd = pairs[..., 0], pairs[..., 1]  # (B, H, T, d/2)
        rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)  # (B, H, T, d/2, 2)
        return rotated.flatten(-2).type_as(x)  # (B, H, T, d)


def llama3_frequencies(
    inv_freq: torch.Tensor, factor: float, low: float, high: float, original: int
) -> torch.Tensor:
    """Llama 3.1's RoPE scaling: wavelengths longer than original / low are stretched by `factor`, those
    shorter than original / high kept, the ones between interpolated smoothly."""
    wavelength = 2 * math.pi / inv_freq  # (d/2,)
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    between = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(between, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


class SwiGLU(nn.Module):
    """Gated feed-forward: down(silu(gate(x)) * up(x)); the gate decides what of `up` passes."""

    def __init__(self, d_model: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.dropout = dropout_layer(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))  # (B, T, C)


def causal_mask(steps: int, keys: int, device: torch.device) -> torch.Tensor | None:
    """(1, 1, T, S) bool, True where query t (the last T of S positions) may see key s; None: all may."""
    if steps == 1:  # one new query sees every cached key
        return None
    return torch.ones(steps, keys, dtype=torch.bool, device=device).tril(diagonal=keys - steps)[None, None]


class GroupedQueryAttention(RecordsAttention):
    """Causal self-attention with RoPE, n_kv_heads key/value heads shared by groups of query heads."""

    def __init__(self, config: ModernConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = config.n_heads, config.kv_heads
        self.head_dim, bias = config.head_dim, config.qkv_bias
        self.q_proj = nn.Linear(config.d_model, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.dropout = config.dropout
        self.explicit = config.attention == "explicit"

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        batch, steps, _ = x.shape
        return x.view(batch, steps, heads, self.head_dim).transpose(1, 2)  # (B, heads, T, d_k)

    def forward(
        self, x: torch.Tensor, rope: RotaryEmbedding, cache: KVCache | StaticKVCache | None = None
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). With a cache, x continues the cached text: its positions start at the
        cache's next slot (an int, or a static cache's device tensor, whose whole capacity is attended
        over with the slots not written yet masked)."""
        batch, steps, _ = x.shape
        start = cache.position if cache is not None else 0
        q = self._heads(self.q_proj(x), self.n_heads)  # (B, H, T, d_k)
        k = self._heads(self.k_proj(x), self.n_kv_heads)  # (B, KV, T, d_k)
        v = self._heads(self.v_proj(x), self.n_kv_heads)  # (B, KV, T, d_k)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, start), rope(k, start)  # rotated by their absolute positions
        static = isinstance(cache, StaticKVCache)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, KV, S, d_k), S = cached + T (static: the capacity)
        groups = self.n_heads // self.n_kv_heads
        explicit = self.explicit or self.recording
        # decoding: the fused kernel reads the shared K/V heads itself (no copy of the whole cache)
        kernel_groups = groups > 1 and cache is not None and not explicit
        if groups > 1 and not kernel_groups:  # query head h reads key/value head h // groups
            k = k.repeat_interleave(groups, dim=1)  # (B, H, S, d_k)
            v = v.repeat_interleave(groups, dim=1)  # (B, H, S, d_k)
        dropout = self.dropout if self.training else 0.0
        # (1, 1, T, S) or None; a static cache's mask also hides the slots not written yet
        mask = (
            cache.mask(steps)
            if isinstance(cache, StaticKVCache)
            else causal_mask(steps, k.shape[2], x.device)
        )
        if explicit:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, T, S)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(dim=-1)  # (B, H, T, S)
            self.record(weights, "decoder")
            if dropout:
                weights = F.dropout(weights, p=dropout)
            out = weights @ v  # (B, H, T, d_k)
        else:
            square = steps == k.shape[2] and not static  # no cache before: the plain causal triangle
            out = fused_attention(
                q,
                k,
                v,
                attn_mask=None if square else mask,
                dropout_p=dropout,
                is_causal=square and steps > 1,
                enable_gqa=kernel_groups,
            )  # (B, H, T, d_k)
        out = out.transpose(1, 2).reshape(batch, steps, self.n_heads * self.head_dim)  # (B, T, H * d_k)
        return self.o_proj(out)  # (B, T, C)

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Score and weighted-sum FLOPs per query token (GQA shares K/V, not these products)."""
        return 2 * 2 * seq_len * self.n_heads * self.head_dim


class ModernBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ff(norm(x))."""

    def __init__(self, config: ModernConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = GroupedQueryAttention(config)
        self.attn_dropout = dropout_layer(config.dropout)
        self.ff_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ff = SwiGLU(config.d_model, config.ff_hidden, config.dropout)

    def forward(
        self, x: torch.Tensor, rope: RotaryEmbedding, cache: KVCache | StaticKVCache | None = None
    ) -> torch.Tensor:
        x = x + self.attn_dropout(self.attn(self.attn_norm(x), rope, cache))  # (B, T, C)
        return x + self.ff(self.ff_norm(x))  # (B, T, C)


@register_model(
    "modern",
    config=ModernConfig,
    description="LLaMA-style decoder LM: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, KV cache",
)
class ModernDecoder(DecoderLM):
    block_type = ModernBlock
    residual_projections = ("o_proj.weight", "ff.down.weight")
    default_lora_targets = (
        "*attn.q_proj.weight",
        "*attn.k_proj.weight",
        "*attn.v_proj.weight",
        "*attn.o_proj.weight",
    )
    config: ModernConfig

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {
            "d_model": 16,
            "n_heads": 2,
            "n_kv_heads": 1,
            "n_layers": 2,
            "d_ff": 32,
            "context_length": 32,
            "dropout": 0.0,
        }

    def add_positions(self) -> None:
        """RoPE's cos/sin tables for the context (buffers, not saved); no position is added to the input."""
        config = self.config
        self.rope = RotaryEmbedding(
            config.head_dim, config.context_length, config.rope_base, config.rope_pairs, config.rope_llama3
        )

    def make_final_norm(self) -> nn.Module:
        return RMSNorm(self.config.d_model, self.config.norm_eps)

    def block_inputs(self) -> tuple[RotaryEmbedding]:
        """Every block's attention rotates q and k with the model's one RotaryEmbedding."""
        return (self.rope,)
