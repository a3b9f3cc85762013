"""The decoder-only shell shared by the gpt and modern families: embedding, blocks, final norm, head,
and decoding with a KV cache, dynamic or static.

    ids (B, T) -> token embedding [+ positions] -> dropout -> N blocks -> final norm -> output head

A family names its block (`block_type`, called block(x, *block_inputs(), cache=cache)) and the matrices
that write into the residual stream (`residual_projections`, for the initialisation), and says how
positions enter through small hooks rather than branches here: `add_positions` registers what positions
need (GPT: a position embedding or table; modern: the RoPE tables), `embed(ids, start)` gives the
features entering the first block (GPT adds its positions to them), `block_inputs` what every block
reads besides x and its cache (modern: the rotary embedding, applied inside attention at the cache's
position), `make_final_norm` the norm before the head.

Decoding keeps a KV cache per layer (`init_state`). When the text reaches the context length the window
slides: the oldest quarter is dropped and the cache rebuilt from the kept tokens, whose positions restart
at 0 exactly as a fresh forward over that window computes them, so generation continues past the context
at a constant amortised cost per token, never indexing out of range.

Fixed-shape decoding (`static_state`): the dynamic cache returns a longer key tensor at every step, so a
compiled step would see a new shape each token. With `StaticKVCache` every layer attends over the whole
capacity, masked up to the current position (a device tensor shared by all layers), so the one-token step
has the same shapes at every position: torch.compile builds it once and, on CUDA (mode reduce-overhead),
replays it as a CUDA graph, one launch per token instead of one per kernel. Prompts and the rebuild after
the window slides run eagerly; they have other shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import ValidationInfo, field_validator
from torch import nn

from lmzoo.config.schema import ModelConfig, NonNegInt, PositiveInt, Probability, RunConfig
from lmzoo.models.attention import KVCache, StaticKVCache
from lmzoo.models.base import DecodingSlots, LanguageModel
from lmzoo.models.heads import OutputHead
from lmzoo.models.layers import dropout_layer, heads_divide_width


class DecoderConfig(ModelConfig):
    """What every decoder-only family configures; a family's config adds its own knobs."""

    d_model: PositiveInt = 128
    n_heads: PositiveInt = 4
    n_layers: PositiveInt = 4
    context_length: PositiveInt = 64
    dropout: Probability = 0.0
    tie_weights: bool = True
    attention: Literal["sdpa", "explicit"] = "sdpa"  # explicit = the formula step by step (teaching, tests)
    # leading vocabulary ids the model never predicts (their logits are the lowest value): the <pad> slot
    # an imported model's vocabulary gets in front of its own tokens
    reserved_ids: NonNegInt = 0

    @field_validator("n_heads")
    @classmethod
    def _heads_divide_width(cls, value: int, info: ValidationInfo) -> int:
        return heads_divide_width(value, info)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads, what the KV cache holds: one per query head (fewer with grouped-query attention)."""
        return self.n_heads

    @property
    def context_len(self) -> int | None:
        return self.context_length

    def check_run(self, run: RunConfig) -> None:
        if run.data.seq_len is not None and run.data.seq_len > self.context_length:
            raise ValueError(
                f"data.seq_len: {run.data.seq_len} is longer than model.context_length {self.context_length}; "
                "a model cannot train on sequences longer than its context"
            )


@dataclass
class DecoderState:
    """Decoding state: one KV cache per layer and the token ids currently in the window (B, L).

    `static`: fixed-shape caches (StaticKVCache) written at `position`; `compiled`: the one-token step
    of a static state runs torch.compile'd (CUDA graphs on CUDA).
    """

    caches: list[KVCache] | list[StaticKVCache] | None = None
    ids: torch.Tensor | None = None
    static: bool = False
    compiled: bool = False
    position: torch.Tensor | None = None  # static: (1,) long, the next slot to write, shared by the caches

    @property
    def length(self) -> int:
        return 0 if self.ids is None else self.ids.shape[1]


class DecoderLM(LanguageModel):
    """A decoder-only LM around a family's block; see the module docstring for the hooks."""

    carries_state = False
    keep_fraction = 0.75  # share of the context kept when the decoding window slides
    block_type: ClassVar[type[nn.Module]]  # called block(x, *block_inputs(), cache=cache) -> (B, T, C)
    # Matrices writing into the residual stream: initialised with std 0.02 / sqrt(2 * n_layers).
    residual_projections: ClassVar[tuple[str, ...]]
    config: DecoderConfig

    def __init__(self, config: DecoderConfig, vocab_size: int) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(vocab_size, config.d_model)
        self.add_positions()
        self.dropout = dropout_layer(config.dropout)
        self.blocks = nn.ModuleList(self.block_type(config) for _ in range(config.n_layers))
        self.final_norm = self.make_final_norm()
        self.head = OutputHead(config.d_model, vocab_size, bias=False, reserved=config.reserved_ids)
        self._init_weights()
        if config.tie_weights:
            self.head.tie_to(self.token_embedding)

    # ---- the family's hooks ----

    def add_positions(self) -> None:
        """Register the modules or buffers positions need (called between the embedding and the blocks)."""

    def make_final_norm(self) -> nn.Module:
        """The norm between the last block and the output head."""
        raise NotImplementedError

    def embed(self, ids: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """Features (B, T, C) entering the first block (before dropout) for `ids` (B, T) at positions
        start, start + 1, ...; `start` is an int, a (1,) device tensor in static decoding, or a (B,)
        tensor in batched decoding (`positions_from`)."""
        return self.token_embedding(ids)  # (B, T, C)

    def block_inputs(self) -> tuple[Any, ...]:
        """What every block is given besides x and its cache."""
        return ()

    # ---- what the rest of lmzoo asks ----

    @property
    def context_len(self) -> int:
        return self.config.context_length

    def fsdp_units(self) -> set[type[nn.Module]]:
        return {self.block_type}

    def adapter_sites(self) -> list[tuple[str, int]]:
        return [(f"blocks.{index}.ff", self.config.d_model) for index in range(len(self.blocks))]

    def _init_weights(self) -> None:
        """GPT-2 initialisation: matrices N(0, 0.02), the residual projections scaled by 1/sqrt(2 * layers)
        so the residual stream does not grow with depth; biases 0, norm gains 1."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if param.dim() >= 2:
                std = residual_std if name.endswith(self.residual_projections) else 0.02
                nn.init.normal_(param, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(param)
            else:
                nn.init.ones_(param)

    # ---- the forward pass and decoding ----

    def init_state(self, batch_size: int) -> DecoderState:
        return DecoderState()

    def decoding_slots(self, capacity: int) -> DecoderSlots:
        return DecoderSlots(self, capacity)

    def static_state(self, batch_size: int, *, compile: bool = False) -> DecoderState:
        """A fixed-shape decoding state: the same tokens as `init_state`'s, but every one-token step has
        the same shapes, so it can be compiled (`compile`; on CUDA captured as a CUDA graph)."""
        return DecoderState(static=True, compiled=compile)

    def features(
        self, ids: torch.Tensor, start: int | torch.Tensor = 0, caches: list | None = None
    ) -> torch.Tensor:
        """ids (B, T) at positions start, start + 1, ... through the blocks (each with its cache, if any)
        and the final norm: (B, T, C)."""
        x = self.dropout(self.embed(ids, start))  # (B, T, C)
        inputs = self.block_inputs()
        for index, block in enumerate(self.blocks):
            x = block(x, *inputs, cache=None if caches is None else caches[index])  # (B, T, C)
        return self.final_norm(x)  # (B, T, C)

    def hidden(
        self, ids: torch.Tensor, state: DecoderState | None = None
    ) -> tuple[torch.Tensor, DecoderState | None]:
        batch, steps = ids.shape
        context = self.config.context_length
        if steps > context:  # with a state too: a sliding window would return fewer positions than given
            raise ValueError(f"sequence of {steps} tokens is longer than the context length {context}")
        if state is None:
            return self.features(ids), None
        if state.length + steps > context:
            return self._slide(ids, state)
        if state.caches is None:
            state.caches = self._new_caches(batch, state)
        if state.static:
            h = self._static_tokens(ids, state)  # (B, T, C)
        else:
            h = self.features(ids, state.length, state.caches)  # (B, T, C)
        state.ids = ids if state.ids is None else torch.cat([state.ids, ids], dim=1)
        return h, state

    def _new_caches(self, batch: int, state: DecoderState) -> list[KVCache] | list[StaticKVCache]:
        """One cache per block for the key/value heads; static ones share a new position tensor."""
        config, like = self.config, self.token_embedding.weight
        shape = (batch, config.kv_heads, config.context_length, config.head_dim)
        if not state.static:
            return [KVCache(*shape, like=like) for _ in self.blocks]
        state.position = torch.zeros(1, dtype=torch.long, device=like.device)
        caches = [StaticKVCache(*shape, like=like, position=state.position) for _ in self.blocks]
        if state.compiled:  # CUDA graphs then write the buffers in place, no copies in and out
            for cache in caches:
                torch._dynamo.mark_static_address(cache.k)
                torch._dynamo.mark_static_address(cache.v)
        return caches

    def _slide(self, ids: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState]:
        """Drop the oldest tokens, rebuild the cache from the kept window, return features of `ids`."""
        context = self.config.context_length
        history = ids if state.ids is None else torch.cat([state.ids, ids], dim=1)
        keep = min(context, max(ids.shape[1], int(context * self.keep_fraction)))
        fresh = DecoderState()
        if state.static:  # the same buffers (and captured graphs), written again from slot 0
            position = state.position.zero_() if state.position is not None else None
            fresh = DecoderState(caches=state.caches, static=True, compiled=state.compiled, position=position)
        h, _ = self.hidden(history[:, -keep:], fresh)  # fills `fresh`
        return h[:, -ids.shape[1] :], fresh

    def _static_tokens(self, ids: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """Features of `ids` written at the static caches' position; one-token steps may run compiled."""
        step = self.features
        if state.compiled and ids.shape[1] == 1:
            if getattr(self, "_compiled_step", None) is None:  # compiled once per model
                mode = "reduce-overhead" if self.token_embedding.weight.is_cuda else None
                self._compiled_step = torch.compile(self.features, mode=mode, dynamic=False)
            step = self._compiled_step
        assert state.position is not None  # set with the static caches
        h = step(ids, state.position, state.caches)  # (B, T, C)
        state.position += ids.shape[1]
        return h


class DecoderSlots(DecodingSlots):
    """Batched decoding rows of a decoder-only LM: per layer a `StaticKVCache` of `capacity` rows whose
    positions are per row, and each row's token ids (to rebuild its window when it slides).

    A step feeds every active row one token at its own position: learned, sinusoidal or rotary
    positions are taken per row and each row's mask hides the slots past its length. A row whose text
    reaches the context slides alone, as a single sequence does: its newest tokens are read again from
    position 0 (`DecoderLM._slide`'s window, less the token this step brings).
    """

    def __init__(self, model: DecoderLM, capacity: int) -> None:
        super().__init__(capacity)
        config, like = model.config, model.token_embedding.weight
        self.model, self.context = model, config.context_length
        self.position = torch.zeros(capacity, dtype=torch.long, device=like.device)  # (R,) next slot per row
        shape = (capacity, config.kv_heads, config.context_length, config.head_dim)
        self.caches = [StaticKVCache(*shape, like=like, position=self.position) for _ in model.blocks]
        self.ids = torch.zeros(capacity, config.context_length, dtype=torch.long, device=like.device)
        self.lengths = [0] * capacity  # the positions, without reading the device

    prefill = "padded"  # causal attention: padding after a prompt changes nothing in it

    def put(self, row: int, single: DecoderState, index: int, length: int) -> None:
        if single.caches is None or length == 0:
            self.position[row], self.lengths[row] = 0, 0
            return
        for layer, cache in enumerate(self.caches):
            source = single.caches[layer]
            cache.k[row, :, :length] = source.k[index, :, :length]
            cache.v[row, :, :length] = source.v[index, :, :length]
        assert single.ids is not None
        self.ids[row, :length] = single.ids[index, :length]
        self.position[row], self.lengths[row] = length, length

    def move(self, source: int, target: int) -> None:
        length = self.lengths[source]
        for cache in self.caches:
            cache.k[target, :, :length] = cache.k[source, :, :length]
            cache.v[target, :, :length] = cache.v[source, :, :length]
        self.ids[target, :length] = self.ids[source, :length]
        self.position[target], self.lengths[target] = length, length

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Features (n, C) of each active row's next token (n,)."""
        count = len(tokens)
        for row in range(count):
            if self.lengths[row] + 1 > self.context:
                self._slide(row)
        span = max(self.lengths[:count]) + 1
        first = self.caches[0].rows(count, span)
        views = [first] + [cache.rows(count, span, like=first) for cache in self.caches[1:]]
        start = self.position[:count]  # (n,)
        h = self.model.features(tokens[:, None], start, views)  # (n, 1, C)
        self.ids[torch.arange(count, device=tokens.device), start] = tokens
        self.position[:count] += 1
        for row in range(count):
            self.lengths[row] += 1
        return h[:, 0]

    def _slide(self, row: int) -> None:
        """Read the row's newest tokens again from position 0, leaving room for this step's token."""
        keep = min(self.context, max(1, int(self.context * self.model.keep_fraction))) - 1
        window = self.ids[row, self.lengths[row] - keep : self.lengths[row]]
        single = DecoderState()
        if keep > 0:
            _, fresh = self.model.hidden(window[None].clone(), single)
            single = fresh if fresh is not None else single
        self.put(row, single, 0, single.length)
