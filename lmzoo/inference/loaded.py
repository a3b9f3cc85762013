"""`LoadedModel`: a model ready for inference, and what the inference core needs to know about it.

A run hands one out (`Run.load`); training builds one around the model it is training. The scorer, the
decoding loop and evaluation take nothing else, so they work the same for a saved run, a model in
training, or a run mixed with a kNN datastore.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmzoo.data.tokenizer import Tokenizer
from lmzoo.errors import ConfigError
from lmzoo.models.base import LanguageModel, Seq2SeqModel, ZooModel


@dataclass
class LoadedModel:
    """Weights on a device (in eval mode for a saved run), the tokenizers, and how text is read.

    `window`: tokens per scoring window (the run's seq_len); `batch_size`: windows per forward pass
    when scoring; `precision`: what scoring runs in (fp32, bf16, fp16); `max_target_len`: seq2seq
    runs, the longest translation (data.max_len).
    """

    model: ZooModel
    tokenizer: Tokenizer  # the source side for seq2seq
    target_tokenizer: Tokenizer | None = None  # seq2seq only (the same object when shared)
    precision: str = "fp32"
    window: int = 128
    batch_size: int = 32
    max_target_len: int = 100

    @property
    def kind(self) -> str:
        return self.model.kind

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_len(self) -> int | None:
        return self.model.context_len if isinstance(self.model, LanguageModel) else None

    @property
    def language_model(self) -> LanguageModel:
        """The model as a language model (a seq2seq model is refused in one line)."""
        if not isinstance(self.model, LanguageModel):
            raise ConfigError("this needs a language model, not a seq2seq model")
        return self.model

    @property
    def seq2seq_model(self) -> Seq2SeqModel:
        """The model as an encoder-decoder (a language model is refused in one line)."""
        if not isinstance(self.model, Seq2SeqModel):
            raise ConfigError("this needs a seq2seq model, not a language model")
        return self.model

    @property
    def output_tokenizer(self) -> Tokenizer:
        """The tokenizer of what the model writes: the target side of a seq2seq model."""
        return self.target_tokenizer or self.tokenizer
