"""The remote-tokenizer endpoints lm-evaluation-harness reads when a model has no Hugging Face tokenizer
(its `tokenizer_backend=remote`, chosen on its own when /tokenizer_info answers), as vLLM serves them:

GET  /tokenizer_info     eos_token, bos_token, pad_token, unk_token, vocab size, context length
POST /tokenize           {"prompt", "add_special_tokens"} -> {"tokens", "count", "max_model_len"}
POST /detokenize         {"tokens"} -> {"prompt"}

A run is named by `model` (in the body, or `?model=` for GET), by the route (/runs/NAME/tokenize), or
is the only run served. Special tokens written as text (<eos>, ...) are read as their ids, as Hugging
Face tokenizers read theirs, so `encode(eos_token)` is the <eos> id. `bos_token` is the text a language
model reads a text from when it is scored on its own: lmzoo's language models train on running text
without a start token, and start after a line break (as an empty prompt does); lm-eval prefixes it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from lmzoo.data.tokenizer import SPECIALS, Tokenizer
from lmzoo.inference.text import start_ids
from lmzoo.serve.errors import bad_request
from lmzoo.serve.schema import validation_error

if TYPE_CHECKING:
    from lmzoo.run import Run

SPECIAL_TEXT = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    add_special_tokens: bool = False  # lmzoo adds no special tokens around a text either way
    model: str | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    tokens: list[int]
    model: str | None = None


def parse(schema: type[BaseModel], raw: dict[str, Any]) -> Any:
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise validation_error(err, schema) from None


def encode_with_specials(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of `text`, with special tokens written as text (<eos>, <bos>, ...) read as their ids."""
    ids: list[int] = []
    for index, piece in enumerate(SPECIAL_TEXT.split(text)):
        if index % 2:
            ids.append(SPECIALS.index(piece))
        elif piece:
            ids += tokenizer.encode(piece)
    return ids


def start_text(tokenizer: Tokenizer) -> str:
    """The text a language model reads a text from: a line break, or <bos> without one in the vocabulary."""
    ids = start_ids(tokenizer)
    return SPECIALS[ids[0]] if ids == [tokenizer.bos_id] else tokenizer.decode(ids)


def tokenizer_info(run: Run) -> dict[str, Any]:
    tokenizer = run.tokenizer
    context = run.config.model.context_len
    return {
        "model": run.name,
        "tokenizer_class": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "eos_token": SPECIALS[tokenizer.eos_id],
        "bos_token": start_text(tokenizer),
        "pad_token": SPECIALS[tokenizer.pad_id],
        "unk_token": SPECIALS[tokenizer.unk_id],
        "model_max_length": context,
        "chat_template": None,
    }


def tokenize(run: Run, request: TokenizeRequest) -> dict[str, Any]:
    ids = encode_with_specials(run.tokenizer, request.prompt)
    context = run.config.model.context_len
    return {"tokens": ids, "count": len(ids), "max_model_len": context}


def detokenize(run: Run, request: DetokenizeRequest) -> dict[str, Any]:
    tokenizer = run.tokenizer
    if request.tokens and (min(request.tokens) < 0 or max(request.tokens) >= tokenizer.vocab_size):
        raise bad_request(
            f"tokens: ids must be between 0 and {tokenizer.vocab_size - 1} (this run's vocabulary)", "tokens"
        )
    return {"prompt": tokenizer.decode(request.tokens)}
