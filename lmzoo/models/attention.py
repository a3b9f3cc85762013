"""Masked multi-head attention, as self-attention and as cross-attention, with a KV cache.

    Q = X W_Q,  K = M W_K,  V = M W_V          (M = X for self-attention, the encoder output for cross)
    head_i = softmax(Q_i K_i^T / sqrt(d_k) + mask) V_i
    out = concat(head_1 .. head_h) W_O

The causal mask fills the upper triangle of Q K^T with -inf (position i sees keys j <= i); the
padding mask hides padded keys. The fast path calls torch's scaled_dot_product_attention (fused
kernels on every device); `explicit=True` computes the formula step by step, for teaching and tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Keys and values of the positions seen so far, in preallocated buffers (B, H, capacity, d_k).

    Appending writes in place, so a decoding step never copies the whole history.
    """

    def __init__(self, batch: int, heads: int, capacity: int, head_dim: int, *, like: torch.Tensor) -> None:
        self.k = like.new_empty(batch, heads, capacity, head_dim)
        self.v = like.new_empty(batch, heads, capacity, head_dim)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def select(self, indices: torch.Tensor) -> KVCache:
        """A cache holding only the given batch rows (beam search reorders hypotheses with it)."""
        chosen = KVCache.__new__(KVCache)
        chosen.k, chosen.v = self.k.index_select(0, indices), self.v.index_select(0, indices)
        chosen.length = self.length
        return chosen

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add (B, H, T, d_k) keys/values; return views of everything cached so far."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; cannot append up to {end}")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class MultiHeadAttention(nn.Module):
    """Multi-head attention with optional causal and key-padding masks and an optional KV cache."""

    def __init__(
        self, d_model: int, n_heads: int, *, dropout: float = 0.0, bias: bool = True, explicit: bool = False
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        # W_Q, W_K, W_V stacked in one matrix: self-attention projects with a single matmul.
        self.in_proj = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)  # W_O
        self.dropout = dropout
        self.explicit = explicit

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, steps, _ = x.shape
        return x.view(batch, steps, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, d_k)

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of a memory (B, S, d) for cross-attention; computed once per source sequence."""
        d = self.d_model
        bias = self.in_proj.bias[d:] if self.in_proj.bias is not None else None
        k, v = F.linear(memory, self.in_proj.weight[d:], bias).split(d, dim=-1)
        return self._split_heads(k), self._split_heads(v)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x: queries (B, T, d). memory: None (self-attention), a (B, S, d) tensor, or its projected (K, V).

        key_padding_mask: (B, S) bool, True where the key is padding. With a cache, the new keys
        are appended and the queries attend over everything cached (causal offsets included).
        """
        batch, steps, d = x.shape
        if memory is None:
            q, k, v = self.in_proj(x).split(d, dim=-1)  # (B, T, d) each
            q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)  # (B, H, T, d_k)
            if cache is not None:
                k, v = cache.append(k, v)  # (B, H, S, d_k), S = cached + T
        else:
            bias = self.in_proj.bias[:d] if self.in_proj.bias is not None else None
            q = self._split_heads(F.linear(x, self.in_proj.weight[:d], bias))
            k, v = memory if isinstance(memory, tuple) else self.project_kv(memory)
        mask = self._mask(steps, k.shape[2], causal, key_padding_mask, x.device)  # True = may attend
        dropout = self.dropout if self.training else 0.0
        if self.explicit:
            out = self._explicit_attention(q, k, v, mask, dropout)
        else:
            simple_causal = causal and key_padding_mask is None and steps == k.shape[2]
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if simple_causal else mask, dropout_p=dropout, is_causal=simple_causal
            )
        out = out.transpose(1, 2).reshape(batch, steps, d)  # heads recombined: (B, T, d)
        return self.out_proj(out)

    @staticmethod
    def _mask(
        steps: int, keys: int, causal: bool, key_padding_mask: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor | None:
        """Boolean (B or 1, 1, T, S) mask, True where attention is allowed; None when nothing is masked."""
        mask = None
        if causal and not (steps == 1 and keys >= 1):  # one new query may see every cached key
            offset = keys - steps  # queries are the last `steps` positions
            mask = torch.ones(steps, keys, dtype=torch.bool, device=device).tril(diagonal=offset)[None, None]
        if key_padding_mask is not None:
            keep = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
            mask = keep if mask is None else mask & keep
        return mask

    def _explicit_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout: float
    ) -> torch.Tensor:
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.softmax(dim=-1)
        if dropout:
            weights = F.dropout(weights, p=dropout)
        return weights @ v  # (B, H, T, d_k)

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Score and weighted-sum FLOPs per query token (read by scripts/bench.py)."""
        return 2 * 2 * seq_len * self.d_model


def sinusoidal_positions(length: int, d_model: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)); shape (length, d)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate[: d_model // 2])
    return table
