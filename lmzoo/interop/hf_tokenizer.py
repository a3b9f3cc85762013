"""Tokenizers across the border: a Hugging Face tokenizer.json into lmzoo (kind hf), and lmzoo's
char, word and BPE tokenizers out as a tokenizer.json that `transformers.AutoTokenizer` loads.

Export builds each lmzoo tokenizer from the `tokenizers` library's parts so that it encodes to the same
ids and decodes back to the same text: a char tokenizer is a WordLevel vocabulary over one-character
pieces joined without spaces; a word tokenizer is a WordLevel vocabulary after the same lowercasing and
punctuation filter, its line breaks the <eos> token; BPE already is a `tokenizers` tokenizer. The
special tokens keep their ids (<pad>=0 <unk>=1 <bos>=2 <eos>=3), and text that spells one stays text
(split_special_tokens), as in lmzoo. An imported tokenizer goes back as it came, without the <pad>
slot lmzoo put in front of it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lmzoo.data.pretrained_tokenizer import OFFSET, PretrainedTokenizer
from lmzoo.data.tokenizer import (
    BOS,
    EOS,
    PAD,
    SPECIALS,
    UNK,
    BpeTokenizer,
    CharTokenizer,
    Tokenizer,
    WordTokenizer,
)
from lmzoo.errors import CheckpointError
from lmzoo.interop.checkpoint_dir import HFCheckpoint
from lmzoo.io import atomic_write_text

TOKENIZER_FILE, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
SPECIALS_MAP = "special_tokens_map.json"


def _token(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _first(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) else None


def read_pretrained_tokenizer(checkpoint: HFCheckpoint, rows: int) -> PretrainedTokenizer:
    """The tokenizer of a Hugging Face model folder with its special tokens, for a model of `rows` tokens."""
    from tokenizers import Tokenizer as Backend

    path = checkpoint.path / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{checkpoint.path}: no {TOKENIZER_FILE}; save the tokenizer in the fast format first "
            "(AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR) writes it)"
        )
    try:
        backend = Backend.from_file(str(path))
    except Exception as err:  # the tokenizers library raises plain Exceptions for a bad file
        raise CheckpointError(f"{path}: not a readable tokenizer.json ({str(err).splitlines()[0]})") from None
    size = backend.get_vocab_size(with_added_tokens=True)
    if size > rows:
        raise CheckpointError(f"{path}: {size} tokens, but the model has only {rows} embedding rows")
    files = checkpoint.json_file(TOKENIZER_CONFIG)
    generation = checkpoint.json_file("generation_config.json")

    def special(name: str) -> int | None:
        stated = checkpoint.config.get(f"{name}_token_id")
        if stated is None:
            stated = generation.get(f"{name}_token_id")
        if _first(stated) is not None:
            return _first(stated)
        token = _token(files.get(f"{name}_token"))
        return None if token is None else backend.token_to_id(token)

    ends = [
        int(i)
        for source in (checkpoint.config.get("eos_token_id"), generation.get("eos_token_id"))
        for i in (source if isinstance(source, list) else [source])
        if isinstance(i, int)
    ]
    specials = {
        "bos": special("bos"),
        "eos": special("eos"),
        "unk": special("unk"),
        "ends": sorted(set(ends)),
    }
    kept = {key: value for key, value in files.items() if key != "added_tokens_decoder"}
    return PretrainedTokenizer(backend, vocab_size=rows + OFFSET, specials=specials, files=kept)


# ---- export ---------------------------------------------------------------------------------------


def _specials_config(tokenizer: Tokenizer, context: int | None) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD,
        "model_max_length": context or 1_000_000,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,  # text that spells "<eos>" is text, as in lmzoo
    }


def _added(backend: Any) -> None:
    from tokenizers import AddedToken

    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIALS])


def _char_backend(tokenizer: CharTokenizer) -> Any:
    """A WordLevel tokenizer over one-character pieces, joined back without spaces."""
    from tokenizers import Regex, decoders, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    backend = Backend(WordLevel(dict(tokenizer.stoi), unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one per code point
    # joined as they are (a decoder's pieces are concatenated; without one they would be space-separated);
    # as in lmzoo, <unk> shows as U+FFFD and the other specials as nothing
    steps: list[Any] = [decoders.Replace(UNK, "\ufffd")] + [decoders.Replace(t, "") for t in (PAD, BOS, EOS)]
    backend.decoder = decoders.Sequence(steps)
    return backend


def _word_backend(tokenizer: WordTokenizer) -> Any:
    """A WordLevel tokenizer after lmzoo's lowercasing and punctuation filter, line breaks as <eos>."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    backend = Backend(WordLevel(dict(tokenizer.stoi), unk_token=UNK))
    steps: list[Any] = [normalizers.Lowercase()] if tokenizer.lowercase else []
    filters = tokenizer.filters.replace("\n", "") if tokenizer.newline_token else tokenizer.filters
    if filters:
        steps.append(normalizers.Replace(Regex("[" + re.escape(filters) + "]"), " "))
    if tokenizer.newline_token:  # a line break is the <eos> word
        steps.append(normalizers.Replace("\n", f" {EOS} "))
    if steps:
        backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # words joined by spaces, no space around a line break; <pad> and <bos> (and <eos> when it is no line
    # break) stand for nothing, as in lmzoo
    silent = [PAD, BOS] + ([] if tokenizer.newline_token else [EOS])
    joined: list[Any] = [decoders.WordPiece(prefix="\x00", cleanup=False), decoders.Fuse()]
    joined += [decoders.Replace(Regex(f"^{re.escape(t)} ?| ?{re.escape(t)}"), "") for t in silent]
    if tokenizer.newline_token:
        joined.append(decoders.Replace(Regex(f" ?{re.escape(EOS)} ?"), "\n"))
    backend.decoder = decoders.Sequence(joined)
    return backend


def write_tokenizer(tokenizer: Tokenizer, out: Path, context: int | None) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json for `tokenizer` in `out`."""
    if isinstance(tokenizer, PretrainedTokenizer):
        atomic_write_text(out / TOKENIZER_FILE, tokenizer.backend.to_str())
        atomic_write_text(out / TOKENIZER_CONFIG, json.dumps(tokenizer.files, indent=2, ensure_ascii=False))
        return
    if isinstance(tokenizer, BpeTokenizer):
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_str(tokenizer.backend.to_str())
    elif isinstance(tokenizer, CharTokenizer):
        backend = _char_backend(tokenizer)
    elif isinstance(tokenizer, WordTokenizer):
        backend = _word_backend(tokenizer)
    else:
        raise CheckpointError(f"a {tokenizer.kind} tokenizer has no tokenizer.json form")
    _added(backend)
    config = _specials_config(tokenizer, context)
    atomic_write_text(out / TOKENIZER_FILE, backend.to_str())
    atomic_write_text(out / TOKENIZER_CONFIG, json.dumps(config, indent=2))
    specials = {key: config[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    atomic_write_text(out / SPECIALS_MAP, json.dumps(specials, indent=2))
