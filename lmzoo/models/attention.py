"""Masked multi-head attention, as self-attention and as cross-attention, with a KV cache.

    Q = X W_Q,  K = M W_K,  V = M W_V          (M = X for self-attention, the encoder output for cross)
    head_i = softmax(Q_i K_i^T / sqrt(d_k) + mask) V_i
    out = concat(head_1 .. head_h) W_O

The causal mask fills the upper triangle of Q K^T with -inf (position i sees keys j <= i); the
padding mask hides padded keys. The fast path calls torch's scaled_dot_product_attention (fused
kernels on every device); `explicit=True` computes the formula step by step, for teaching and tests.

`record_attention(model)` makes every attention module of a model (any `RecordsAttention`) take the
explicit path and keep its softmax weights, which `lmzoo attention` draws; SDPA cannot return them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# On the CPU, torch's flash-attention backward pass runs several times slower in bf16 than in fp32
# (torch 2.13 at configs/gpt.yaml's shapes: 6x), so under bf16 autocast the CPU computes attention
# in fp32; CUDA keeps bf16. scripts/bench.py switches this off to measure what it gives.
CPU_BF16_ATTENTION_IN_FP32 = True

# torch prefers cuDNN's fused attention on recent NVIDIA cards, and cuDNN builds an execution plan for
# every new shape: 6-8 ms of CPU per call on an H200 (torch 2.11), against 0.2 ms of GPU work. Token-
# batched seq2seq changes shapes at every step (207 ms a step with cuDNN, 48 without); fixed-shape GPT
# training gains 14% from it in eager mode and nothing compiled. So CUDA uses torch's flash and
# memory-efficient kernels; True restores torch's own choice (docs/speed.md has the figures).
CUDA_CUDNN_ATTENTION = False
_CUDA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """The SDPA backends lmzoo lets torch choose from on `device` (all but cuDNN's on CUDA)."""
    if device.type != "cuda" or CUDA_CUDNN_ATTENTION:
        return contextlib.nullcontext()
    return sdpa_kernel(_CUDA_BACKENDS)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: Any) -> torch.Tensor:
    """F.scaled_dot_product_attention, with bf16 on the CPU computed in fp32 and CUDA choosing among
    attention_backends (each faster there; see above)."""
    cpu_bf16 = q.device.type == "cpu" and torch.bfloat16 in (q.dtype, k.dtype)
    if not (cpu_bf16 and CPU_BF16_ATTENTION_IN_FP32):
        with attention_backends(q.device):
            return F.scaled_dot_product_attention(q, k, v, **options)
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **options)
    return out.to(q.dtype)


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

    @property
    def position(self) -> int:
        """The position of the next token written (a StaticKVCache keeps it as a device tensor)."""
        return self.length

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


class StaticKVCache:
    """A KV cache whose shapes never change, for a compiled (or CUDA-graph captured) decoding step, and the
    per-row cache of batched decoding.

    Buffers (B, H, capacity, d_k) are written at `position` and queries attend over the whole capacity
    with a mask hiding the slots not written yet, so a one-token step has the same shapes at every
    position. `position` is a (1,) device tensor shared by every layer and every row (advanced by the
    model after each step), or a (B,) tensor, one position per row: rows of a batch decoding different
    sequences, each at its own length (`lmzoo.models.decoder.DecoderSlots`). `span` (batched decoding)
    limits what is attended over to the first `span` slots, the longest row's length.
    """

    def __init__(
        self,
        batch: int,
        heads: int,
        capacity: int,
        head_dim: int,
        *,
        like: torch.Tensor,
        position: torch.Tensor,
    ) -> None:
        self.k = like.new_zeros(batch, heads, capacity, head_dim)  # zeros: a masked slot must not be NaN
        self.v = like.new_zeros(batch, heads, capacity, head_dim)
        self.position = position
        self.slots = torch.arange(capacity, device=like.device)
        self.span: int | None = None
        self.shared: tuple[torch.Tensor, torch.Tensor] | None = None  # one step's (write index, mask)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def rows(self, count: int, span: int | None = None, like: StaticKVCache | None = None) -> StaticKVCache:
        """A view of the first `count` rows (buffers and positions shared: writes land here), attending
        over the first `span` slots, for a one-token step. `like`: a view of another layer's cache for
        the same step, whose write index and mask this one reuses (every layer has the same)."""
        view = StaticKVCache.__new__(StaticKVCache)
        view.k, view.v, view.position = self.k[:count], self.v[:count], self.position[:count]
        view.slots, view.span, view.shared = self.slots, span, None
        if like is not None:
            view.shared = like.shared
        else:
            view.shared = (self._write_index(view.position, 1, view.k), view.mask(1))
        return view

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, H, T, d_k) keys/values at position .. position + T - 1 (each row at its own position
        when positions are per row); return the buffers up to the span (the whole capacity without one)."""
        steps = k.shape[2]
        if self.position.numel() == 1:  # one position for every row
            index = self.position + torch.arange(steps, device=k.device)
            self.k.index_copy_(2, index, k.to(self.k.dtype))
            self.v.index_copy_(2, index, v.to(self.v.dtype))
        else:
            index = self.shared[0] if self.shared is not None else self._write_index(self.position, steps, k)
            self.k.scatter_(2, index, k.to(self.k.dtype))
            self.v.scatter_(2, index, v.to(self.v.dtype))
        if self.span is None:
            return self.k, self.v
        return self.k[:, :, : self.span], self.v[:, :, : self.span]

    @staticmethod
    def _write_index(position: torch.Tensor, steps: int, like: torch.Tensor) -> torch.Tensor:
        """(B, H, T, d_k) slot index of per-row positions, for scatter_ along the slot axis."""
        index = position[:, None] + torch.arange(steps, device=position.device)  # (B, T)
        return index[:, None, :, None].expand(like.shape[0], like.shape[1], steps, like.shape[3])

    def mask(self, steps: int) -> torch.Tensor:
        """(1 or B, 1, T, S) bool: the query at position + t sees the slots up to its own position."""
        if self.shared is not None and steps == 1:
            return self.shared[1]
        slots = self.slots if self.span is None else self.slots[: self.span]
        queries = self.position.view(-1, 1) + torch.arange(steps, device=self.slots.device)  # (1 or B, T)
        return (slots[None, None, :] <= queries[:, :, None])[:, None]


class RecordsAttention(nn.Module):
    """An attention module that can hand out its weights while `record_attention` is active.

    A subclass computes softmax weights explicitly when `recording` is True and passes them to
    `record(weights (B, H, T, S), kind)`, kind one of ATTENTION_KINDS.
    """

    _attention_sink: Callable[[torch.Tensor, str], None] | None = None

    @property
    def recording(self) -> bool:
        return self._attention_sink is not None

    def record(self, weights: torch.Tensor, kind: str) -> None:
        if self._attention_sink is not None:
            self._attention_sink(weights.detach(), kind)


# self: bidirectional self-attention (an encoder); decoder: masked (causal) self-attention (a GPT, a
# Transformer decoder); cross: target positions over the source (encoder-decoder models).
ATTENTION_KINDS = ("self", "decoder", "cross")


class AttentionMaps(dict):
    """Module name -> attention weights (B, H, T, S) of its last call; `kinds[name]` says which kind."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: dict[str, str] = {}


def attention_modules(model: nn.Module) -> list[tuple[str, RecordsAttention]]:
    """(name, module) of every attention module of `model` that can record its weights."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, RecordsAttention)]


@contextlib.contextmanager
def record_attention(model: nn.Module) -> Iterator[AttentionMaps]:
    """While active, every attention module of `model` stores its weights in the yielded dict.

    The explicit path computes the same function as the fused one, so outputs do not change.
    """
    maps = AttentionMaps()
    modules = attention_modules(model)

    def sink_for(name: str) -> Callable[[torch.Tensor, str], None]:
        def sink(weights: torch.Tensor, kind: str) -> None:
            maps[name], maps.kinds[name] = weights, kind

        return sink

    for name, module in modules:
        module._attention_sink = sink_for(name)
    try:
        yield maps
    finally:
        for _, module in modules:
            module._attention_sink = None


class MultiHeadAttention(RecordsAttention):
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
        cache: KVCache | StaticKVCache | None = None,
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
        static = isinstance(cache, StaticKVCache)  # fixed shapes: the whole capacity, masked
        mask = (
            cache.mask(steps)
            if isinstance(cache, StaticKVCache)
            else self._mask(steps, k.shape[2], causal, key_padding_mask, x.device)
        )
        dropout = self.dropout if self.training else 0.0
        if self.explicit or self.recording:
            kind = "cross" if memory is not None else ("decoder" if causal else "self")
            out = self._explicit_attention(q, k, v, mask, dropout, kind)
        else:
            simple_causal = causal and key_padding_mask is None and steps == k.shape[2] and not static
            out = fused_attention(
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
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        dropout: float,
        kind: str = "self",
    ) -> torch.Tensor:
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = scores.softmax(dim=-1)
        self.record(weights, kind)
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
