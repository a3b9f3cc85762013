"""A pretrained model's own tokenizer (kind hf): the tokenizer.json a Hugging Face model was trained
with, run by the `tokenizers` library, behind lmzoo's tokenizer interface.

lmzoo id = its id + 1. Every lmzoo batch, loss and mask reads id 0 as <pad> (what batches are padded
with and losses ignore); shifting the imported ids by one keeps that true without touching any of
them, where a vocabulary such as GPT-2's uses id 0 for a real token ("!"). The imported model gets the
matching row in front of its embedding and output layer, never predicted (model.reserved_ids), so its
logits over its own tokens are unchanged; export removes the row again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from lmzoo.config.schema import TokenizerConfig
from lmzoo.data.tokenizer import PAD, Tokenizer, register_tokenizer
from lmzoo.errors import DataError

OFFSET = 1  # lmzoo id of the pretrained tokenizer's id 0


class PretrainedTokenizerConfig(TokenizerConfig):
    """A pretrained model's own tokenizer (its tokenizer.json), imported with the model; nothing is fitted."""

    kind: Literal["hf"] = "hf"


@register_tokenizer("hf", config=PretrainedTokenizerConfig)
class PretrainedTokenizer(Tokenizer):
    """An imported tokenizer.json with its special tokens.

    `specials` holds the tokenizer's own ids (before the shift) of bos, eos, unk (each may be None) and
    `ends`, every id that ends a generation (a chat model's end-of-turn besides its eos). <bos>, <eos>
    and <unk> are those tokens: GPT-2's <|endoftext|> is both <bos> and <eos>; without a <bos>, <eos>
    starts a text; without an <unk> (byte-level BPE needs none) it is <pad>, which never occurs.
    `vocab_size` is the model's (it may have rows no token uses); `files` keeps tokenizer_config.json
    for export.
    """

    fits = False

    def __init__(self, backend: Any, *, vocab_size: int, specials: dict[str, Any], files: dict) -> None:
        self.backend, self.rows = backend, vocab_size
        self.specials, self.files = specials, files
        self.eos_id = self._shifted("eos") or self.pad_id
        self.bos_id = self._shifted("bos") or self.eos_id
        self.unk_id = self._shifted("unk") or self.pad_id

    def _shifted(self, name: str) -> int | None:
        found = self.specials.get(name)
        return None if found is None else found + OFFSET

    @classmethod
    def fit(cls, text: str, config: Any) -> PretrainedTokenizer:
        raise DataError(
            "tokenizer kind hf is a pretrained model's own tokenizer: it comes with init_from: hf:DIR "
            "(or lmzoo import DIR); choose char, word or bpe to fit one"
        )

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> PretrainedTokenizer:
        from tokenizers import Tokenizer as Backend

        meta = {key: payload[key] for key in ("vocab_size", "specials", "files")}
        return cls(Backend.from_str(payload["backend"]), **meta)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend.to_str(),
            "vocab_size": self.rows,
            "specials": self.specials,
            "files": self.files,
        }

    @property
    def vocab_size(self) -> int:
        return self.rows

    @property
    def never_generated(self) -> tuple[int, ...]:
        return (self.pad_id,)  # the model's own specials stay possible, as in the library it came from

    @property
    def end_ids(self) -> tuple[int, ...]:
        ends = [self.eos_id] + [i + OFFSET for i in self.specials.get("ends") or ()]
        return tuple(dict.fromkeys(i for i in ends if i != self.pad_id))

    def encode(self, text: str) -> list[int]:
        return [i + OFFSET for i in self.backend.encode(text, add_special_tokens=False).ids]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([i - OFFSET for i in ids if i >= OFFSET], skip_special_tokens=True)

    def unknown_pieces(self, text: str) -> list[str]:
        unk = self.specials.get("unk")
        if unk is None:
            return []
        found = self.backend.encode(text, add_special_tokens=False)
        return sorted({text[a:b] for i, (a, b) in zip(found.ids, found.offsets, strict=True) if i == unk})

    def special_name(self, token_id: int) -> str:
        if token_id < OFFSET:
            return PAD
        found = self.backend.get_added_tokens_decoder().get(token_id - OFFSET)
        return found.content if found is not None and found.special else ""
