"""`LoadedModel`: a model ready for inference, and what the inference core needs to know about it.

A run hands one out (`Run.load`); training builds one around the model it is training. The scorer, the
decoding loop and evaluation take nothing else, so they work the same for a saved run, a model in
training, or a run mixed with a kNN datastore.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmzoo.data.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    """Weights on a device (in eval mode for a saved run), the tokenizers, and how text is read.

    `window`: tokens per scoring window (the run's seq_len); `batch_size`: windows per forward pass
    when scoring; `precision`: what scoring runs in (fp32, bf16, fp16); `max_target_len`: seq2seq
    runs, the longest translation (data.max_len).
    """

    model: torch.nn.Module
    tokenizer: Tokenizer  # the source side for seq2seq
    target_tokenizer: Tokenizer | None = None  # seq2seq only (the same object when shared)
    precision: str = "fp32"
    window: int = 128
    batch_size: int = 32
    max_target_len: int = 100

    @property
    def kind(self) -> str:
        return str(getattr(self.model, "kind", "lm"))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_len(self) -> int | None:
        return getattr(self.model, "context_len", None)

    @property
    def output_tokenizer(self) -> Tokenizer:
        """The tokenizer of what the model writes: the target side of a seq2seq model."""
        return self.target_tokenizer or self.tokenizer
