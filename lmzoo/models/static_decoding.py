"""Fixed-shape decoding for decoder-only Transformers: a static KV cache and a compiled one-token step.

The dynamic KV cache (lmzoo.models.attention.KVCache) returns a longer key tensor at every step, so
a compiled step would see a new shape each token. With `StaticKVCache` every layer attends over the
whole capacity (masked up to the current position, a device tensor), so the one-token step has the
same shapes at every position: torch.compile builds it once and, on CUDA (mode reduce-overhead),
replays it as a CUDA graph: one launch per token instead of one per kernel. Prompts and the rebuild
after the window slides run eagerly; they have other shapes.
"""

from __future__ import annotations

from typing import Any

import torch

from lmzoo.models.attention import StaticKVCache


class StaticDecoding:
    """What a decoder LM mixes in for `static_state`. It needs `blocks` (each called block(x, cache)),
    `_embed(ids, start)` taking a tensor start, `final_norm`, `token_embedding` and a state class (its
    `init_state`) with fields caches, static, compiled and position."""

    blocks: Any
    final_norm: Any
    token_embedding: torch.nn.Embedding

    def static_state(self, batch_size: int, *, compile: bool = False) -> Any:
        """A fixed-shape decoding state: the same tokens as `init_state`, but every one-token step has
        the same shapes, so it can be compiled (`compile`; on CUDA captured as a CUDA graph)."""
        state = self.init_state(batch_size)  # type: ignore[attr-defined]
        state.static, state.compiled = True, compile
        return state

    def static_caches(self, batch: int, state: Any, heads: int, capacity: int, head_dim: int) -> list:
        """One StaticKVCache per block, sharing the state's position tensor."""
        like = self.token_embedding.weight
        state.position = torch.zeros(1, dtype=torch.long, device=like.device)
        caches = [
            StaticKVCache(batch, heads, capacity, head_dim, like=like, position=state.position)
            for _ in self.blocks
        ]
        if state.compiled:  # CUDA graphs then write the buffers in place, no copies in and out
            for cache in caches:
                torch._dynamo.mark_static_address(cache.k)
                torch._dynamo.mark_static_address(cache.v)
        return caches

    def static_tokens(self, ids: torch.Tensor, state: Any) -> torch.Tensor:
        """Features of `ids` written at the static caches' position; one-token steps may run compiled."""
        step = self._static_step
        if state.compiled and ids.shape[1] == 1:
            if getattr(self, "_compiled_static_step", None) is None:  # compiled once per model
                mode = "reduce-overhead" if self.token_embedding.weight.is_cuda else None
                self._compiled_static_step = torch.compile(self._static_step, mode=mode, dynamic=False)
            step = self._compiled_static_step
        h = step(ids, state.position, state.caches)
        state.position += ids.shape[1]
        return h

    def _static_step(self, ids: torch.Tensor, position: torch.Tensor, caches: list) -> torch.Tensor:
        x = self._embed(ids, position)  # type: ignore[attr-defined]
        for block, cache in zip(self.blocks, caches, strict=True):
            x = block(x, cache)
        return self.final_norm(x)
