"""What every language model shares: the forward contract and state helpers.

A language model maps ids (B, T) and an optional decoding state to logits (B, T, V) and a new
state. Given `targets`, it returns the mean token loss instead of the logits, computed from the
features by the output head, so a loss never needs the full logits tensor (which matters for an
adaptive softmax) and a wrapped model (DDP, compile) is still called through `forward`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmzoo.models.heads import OutputHead

PAD_ID = 0  # every lmzoo tokenizer puts <pad> at id 0; losses ignore it


class LanguageModel(nn.Module):
    kind = "lm"
    # True when training should carry the state from one batch to the next (truncated BPTT).
    carries_state = False
    label_smoothing = 0.0  # set by the trainer from train.label_smoothing
    head: OutputHead

    @property
    def context_len(self) -> int | None:
        return None

    def init_state(self, batch_size: int) -> Any:
        """The state to pass with a prompt to start decoding (None: the model builds its own)."""
        return None

    def features(self, ids: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def forward(
        self, ids: torch.Tensor, state: Any = None, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any]:
        """(logits (B, T, V), state), or (mean loss over targets != pad, state) when targets are given."""
        h, state = self.features(ids, state)  # (B, T, C)
        if targets is None:
            return self.head.logits(h), state
        return self.head.loss(h, targets, ignore_index=PAD_ID, label_smoothing=self.label_smoothing), state


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], value: Any) -> Any:
    """`fn` applied to every tensor inside nested tuples/lists/dicts; anything else kept as is."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(fn, v) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(fn, v) for k, v in value.items()}
    return value


def detach_state(state: Any) -> Any:
    """Cut the autograd history of a carried state (tensors inside tuples/lists/dicts)."""
    return map_tensors(torch.Tensor.detach, state)


def seq2seq_vocab_sizes(vocab_size: int | tuple[int, int], share_embeddings: bool) -> tuple[int, int]:
    """(source, target) vocabulary sizes: one int means a shared tokenizer."""
    src_vocab, tgt_vocab = (vocab_size, vocab_size) if isinstance(vocab_size, int) else vocab_size
    if share_embeddings and src_vocab != tgt_vocab:
        raise ValueError("share_embeddings needs one vocabulary for source and target")
    return src_vocab, tgt_vocab


class Seq2SeqModel(nn.Module):
    """An encoder-decoder: `encode(src, src_mask) -> memory`, `decode(tgt, memory, src_mask, state)`.

    src_mask is (B, S) bool, True at padding. Greedy, sampling and beam search (lmzoo.translate)
    are written once against this contract; a model adds `init_decode_state` (what incremental
    decoding starts from) and `reorder_state` (beam search's reshuffle of hypotheses).
    """

    kind = "seq2seq"
    label_smoothing = 0.0  # set by the trainer from train.label_smoothing
    head: OutputHead

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> Any:
        raise NotImplementedError

    def decode_features(
        self, tgt: torch.Tensor, memory: Any, src_mask: torch.Tensor, state: Any = None
    ) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def init_decode_state(self, memory: Any, src_mask: torch.Tensor) -> Any:
        raise NotImplementedError

    def reorder_state(self, state: Any, indices: torch.Tensor) -> Any:
        raise NotImplementedError

    def decode(
        self, tgt: torch.Tensor, memory: Any, src_mask: torch.Tensor, state: Any = None
    ) -> tuple[torch.Tensor, Any]:
        """Logits (B, T, V) of the next target tokens, and the state to continue from."""
        h, state = self.decode_features(tgt, memory, src_mask, state)
        return self.head.logits(h), state

    def forward(
        self, src: torch.Tensor, tgt_in: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, None]:
        """Teacher forcing: (logits (B, T, V), None), or (mean loss over non-pad targets, None)."""
        src_mask = src == PAD_ID
        memory = self.encode(src, src_mask)
        h, _ = self.decode_features(tgt_in, memory, src_mask)
        if targets is None:
            return self.head.logits(h), None
        return self.head.loss(h, targets, ignore_index=PAD_ID, label_smoothing=self.label_smoothing), None


def select_rows(value: Any, indices: torch.Tensor) -> Any:
    """Pick batch rows (dim 0) of every tensor inside tuples/lists/dicts (beam search's memory shuffle)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.index_select(0, indices)
    if isinstance(value, (list, tuple)):
        return type(value)(select_rows(v, indices) for v in value)
    if isinstance(value, dict):
        return {k: select_rows(v, indices) for k, v in value.items()}
    raise TypeError(f"cannot select rows of {type(value).__name__}")
