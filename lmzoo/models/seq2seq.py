"""RNN encoder-decoder with attention (Seq2Seq): encoder -> context -> decoder.

The encoder reads the source with a (bidirectional) LSTM or GRU; a bridge turns its final state
into the decoder's first state. The decoder reads the target (teacher forcing in training) and,
at every step, attends over all encoder states (Luong "dot"/"general" or Bahdanau "additive"
scores); the attentional state tanh(W_c [h_t; c_t]) feeds the output layer. Padded source
positions are packed away in the encoder and masked out of the attention, so a sentence gives the
same output alone as in a padded batch.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import ValidationInfo, field_validator
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lmzoo.config.schema import ModelConfig, PositiveInt, Probability, RunConfig
from lmzoo.models.attention import RecordsAttention
from lmzoo.models.base import DecodingSlots, Seq2SeqModel, seq2seq_vocab_sizes
from lmzoo.models.heads import OutputHead
from lmzoo.models.registry import register_model


class Seq2SeqConfig(ModelConfig):
    name: Literal["seq2seq"] = "seq2seq"
    cell: Literal["lstm", "gru"] = "lstm"
    embedding_dim: PositiveInt = 256
    hidden_size: PositiveInt = 256
    encoder_layers: PositiveInt = 1
    decoder_layers: PositiveInt = 1
    bidirectional: bool = True
    # dot: h . m (needs equal sizes); general: h . W m; additive: v . tanh(W_h h + W_m m)
    attention: Literal["dot", "general", "additive"] = "general"
    dropout: Probability = 0.2
    share_embeddings: bool = False  # one embedding for source and target (needs one shared tokenizer)
    tie_weights: bool = False  # output layer shares the target embedding

    @field_validator("attention")
    @classmethod
    def _dot_needs_equal_sizes(cls, value: str, info: ValidationInfo) -> str:
        if value == "dot" and info.data.get("bidirectional", True):
            raise ValueError(
                "dot attention needs encoder and decoder states of one size; use general with a "
                "bidirectional encoder"
            )
        return value

    def check_run(self, run: RunConfig) -> None:
        if self.share_embeddings and run.target_tokenizer is not None:
            raise ValueError(
                "model.share_embeddings: needs one tokenizer for both sides (remove target_tokenizer)"
            )


class RecurrentAttention(RecordsAttention):
    """Scores of decoder states against encoder states, masked softmax, weighted sum of encoder states."""

    def __init__(self, kind: str, query_dim: int, key_dim: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "general":
            self.key_proj = nn.Linear(key_dim, query_dim, bias=False)  # W in h . W m
        elif kind == "additive":
            self.key_proj = nn.Linear(key_dim, query_dim, bias=False)  # W_m
            self.query_proj = nn.Linear(query_dim, query_dim)  # W_h
            self.v = nn.Linear(query_dim, 1, bias=False)

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        """The part of the score that depends only on the encoder states: computed once per source."""
        return memory if self.kind == "dot" else self.key_proj(memory)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, src_mask: torch.Tensor
    ) -> torch.Tensor:
        if self.kind == "additive":
            hidden = torch.tanh(self.query_proj(query)[:, :, None, :] + keys[:, None, :, :])  # (B, T, S, H)
            scores = self.v(hidden).squeeze(-1)  # (B, T, S)
        else:
            scores = query @ keys.transpose(1, 2)  # (B, T, S)
        scores = scores.masked_fill(src_mask[:, None, :], float("-inf"))
        weights = scores.softmax(-1)  # (B, T, S)
        self.record(weights[:, None], "cross")  # one "head"
        return weights @ values  # context (B, T, H_enc)


@register_model(
    "seq2seq",
    config=Seq2SeqConfig,
    description="RNN encoder-decoder with attention: (bi)LSTM/GRU encoder, attentive decoder",
)
class RecurrentSeq2Seq(Seq2SeqModel):
    default_lora_targets = ("*weight_ih*", "*weight_hh*")

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        return {
            "embedding_dim": 8,
            "hidden_size": 16,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "dropout": 0.0,
        }

    def adapter_sites(self) -> list[tuple[str, int]]:
        # the decoder only: a packed-sequence encoder has no per-position output to adapt
        return [("decoder", self.config.hidden_size)]

    def __init__(self, config: Seq2SeqConfig, vocab_size: int | tuple[int, int]) -> None:
        super().__init__()
        self.config = config
        src_vocab, tgt_vocab = seq2seq_vocab_sizes(vocab_size, config.share_embeddings)
        emb, hidden = config.embedding_dim, config.hidden_size
        rnn = nn.LSTM if config.cell == "lstm" else nn.GRU
        self.src_embedding = nn.Embedding(src_vocab, emb)
        self.tgt_embedding = self.src_embedding if config.share_embeddings else nn.Embedding(tgt_vocab, emb)
        self.dropout = nn.Dropout(config.dropout)
        self.encoder = rnn(
            emb,
            hidden,
            config.encoder_layers,
            batch_first=True,
            bidirectional=config.bidirectional,
            dropout=config.dropout if config.encoder_layers > 1 else 0.0,
        )
        enc_dim = hidden * (2 if config.bidirectional else 1)
        self.bridge = nn.Linear(enc_dim, hidden * config.decoder_layers)
        self.decoder = rnn(
            emb,
            hidden,
            config.decoder_layers,
            batch_first=True,
            dropout=config.dropout if config.decoder_layers > 1 else 0.0,
        )
        self.attention = RecurrentAttention(config.attention, hidden, enc_dim)
        self.combine = nn.Linear(hidden + enc_dim, hidden)  # W_c
        width = hidden
        self.out_proj: nn.Module = nn.Identity()
        if config.tie_weights and hidden != emb:
            self.out_proj = nn.Linear(hidden, emb, bias=False)
            width = emb
        self.head = OutputHead(width, tgt_vocab)
        if config.tie_weights:
            self.head.tie_to(self.tgt_embedding)

    def encode(
        self, src: torch.Tensor, src_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(encoder states (B, S, H_enc), attention keys, the decoder's first hidden state (B, L, H))."""
        lengths = (~src_mask).sum(1).clamp(min=1).cpu()
        x = self.dropout(self.src_embedding(src))  # (B, S, E)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        outputs, final = self.encoder(packed)
        outputs, _ = pad_packed_sequence(
            outputs, batch_first=True, total_length=src.shape[1]
        )  # (B, S, H_enc)
        h_n = final[0] if isinstance(final, tuple) else final  # (layers * dirs, B, H)
        last = torch.cat([h_n[-2], h_n[-1]], dim=-1) if self.config.bidirectional else h_n[-1]  # (B, H_enc)
        start = torch.tanh(self.bridge(last)).view(src.shape[0], self.config.decoder_layers, -1)  # (B, L, H)
        return outputs, self.attention.keys(outputs), start

    def init_decode_state(self, memory: Any, src_mask: torch.Tensor) -> Any:
        start = memory[2].transpose(0, 1).contiguous()  # (L, B, H)
        return (start, torch.zeros_like(start)) if self.config.cell == "lstm" else start

    def decoding_slots(self, capacity: int) -> RecurrentSeq2SeqSlots:
        return RecurrentSeq2SeqSlots(self, capacity)

    def reorder_state(self, state: Any, indices: torch.Tensor) -> Any:
        if isinstance(state, tuple):
            return tuple(s.index_select(1, indices) for s in state)
        return state.index_select(1, indices)

    def decode_hidden(
        self, tgt: torch.Tensor, memory: Any, src_mask: torch.Tensor, state: Any = None
    ) -> tuple[torch.Tensor, Any]:
        outputs, keys, _ = memory
        if state is None:
            state = self.init_decode_state(memory, src_mask)
        h, state = self.decoder(self.dropout(self.tgt_embedding(tgt)), state)  # (B, T, H)
        context = self.attention(h, keys, outputs, src_mask)  # (B, T, H_enc)
        attentional = torch.tanh(self.combine(torch.cat([h, context], dim=-1)))  # (B, T, H)
        return self.out_proj(self.dropout(attentional)), state


class SourceRows:
    """Per-row encoder output of batched seq2seq decoding: tensors (R, S, ...) padded to the longest
    source taken in so far (grown when a longer one comes), and the source mask (R, S), True at padding."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.tensors: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None
        self.lengths = [0] * capacity

    def put(self, row: int, tensors: list[torch.Tensor], mask: torch.Tensor, dim: int = 1) -> None:
        """Row `row` takes one source's tensors (1, S, ...) (their source axis at `dim`) and mask (1, S)."""
        width = mask.shape[1]
        if self.mask is None or width > self.mask.shape[1]:
            self._grow(tensors, mask, dim)
        assert self.mask is not None
        for target, source in zip(self.tensors, tensors, strict=True):
            target[row].narrow(dim - 1, 0, width).copy_(source[0])
            target[row].narrow(dim - 1, width, target.shape[dim] - width).zero_()
        self.mask[row] = True
        self.mask[row, :width] = mask[0]
        self.lengths[row] = width

    def _grow(self, tensors: list[torch.Tensor], mask: torch.Tensor, dim: int) -> None:
        width = mask.shape[1]
        grown = []
        for index, source in enumerate(tensors):
            shape = [self.capacity, *source.shape[1:]]
            fresh = source.new_zeros(shape)
            if self.tensors:
                old = self.tensors[index]
                fresh.narrow(dim, 0, old.shape[dim]).copy_(old)
            grown.append(fresh)
        fresh_mask = mask.new_ones(self.capacity, width)
        if self.mask is not None:
            fresh_mask[:, : self.mask.shape[1]] = self.mask
        self.tensors, self.mask = grown, fresh_mask

    def move(self, source: int, target: int) -> None:
        assert self.mask is not None
        for t in self.tensors:
            t[target] = t[source]
        self.mask[target] = self.mask[source]
        self.lengths[target] = self.lengths[source]

    def rows(self, count: int, dim: int = 1) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The first `count` rows, cut to the longest of their sources."""
        assert self.mask is not None
        span = max(self.lengths[:count])
        return [t[:count].narrow(dim, 0, span) for t in self.tensors], self.mask[:count, :span]


class RecurrentSeq2SeqSlots(DecodingSlots):
    """Batched decoding rows of the RNN encoder-decoder: each row's encoder states and attention keys
    (padded, masked), and the decoder's hidden state (and LSTM cell) of every row."""

    def __init__(self, model: RecurrentSeq2Seq, capacity: int) -> None:
        super().__init__(capacity)
        self.model, self.sources = model, SourceRows(capacity)
        self.state: list[torch.Tensor] = []  # (L, R, H) each: h, and c for an LSTM

    prefill = "padded"  # the encoder packs a source's padding away; attention masks it

    def put(self, row: int, single: Any, index: int, length: int) -> None:
        (outputs, keys, _), src_mask, state = single
        own = slice(index, index + 1)
        self.sources.put(row, [outputs[own], keys[own]], src_mask[own])
        parts = list(state) if isinstance(state, tuple) else [state]
        if not self.state:
            self.state = [p.new_zeros(p.shape[0], self.capacity, *p.shape[2:]) for p in parts]
        for target, part in zip(self.state, parts, strict=True):
            target[:, row] = part[:, index]

    def move(self, source: int, target: int) -> None:
        self.sources.move(source, target)
        for part in self.state:
            part[:, target] = part[:, source]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        count = len(tokens)
        (outputs, keys), src_mask = self.sources.rows(count)
        views = [part[:, :count] for part in self.state]  # (L, n, H)
        given = [view.contiguous() for view in views]  # torch's RNNs take contiguous states
        state = tuple(given) if len(given) == 2 else given[0]
        h, new = self.model.decode_hidden(tokens[:, None], (outputs, keys, None), src_mask, state)
        for view, value in zip(views, new if isinstance(new, tuple) else (new,), strict=True):
            view.copy_(value)
        return h[:, 0]  # (n, C)
