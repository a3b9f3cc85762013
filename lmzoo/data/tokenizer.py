"""Character, word and byte-level BPE tokenizers behind one interface, saved as one JSON file.

Tokenizers are registered like models: each kind with its own config class (the YAML
`tokenizer:` section is validated against it) and its tokenizer class (`fit`, `from_dict`).
Every tokenizer lmzoo fits reserves the same four special ids at the front of its vocabulary:
<pad>=0 (ignored by losses), <unk>=1, <bos>=2, <eos>=3. A pretrained model's tokenizer (kind hf,
lmzoo.data.pretrained_tokenizer) keeps its own ids, shifted by one so that id 0 is <pad> there too.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from lmzoo.config.schema import PositiveInt, TokenizerConfig
from lmzoo.errors import CheckpointError, DataError
from lmzoo.io import atomic_write_text

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = (PAD, UNK, BOS, EOS)
FORMAT = "lmzoo.tokenizer"
FORMAT_VERSION = 1
KERAS_FILTERS = '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n'
MARK = "\x00"  # stands for a line end while the word tokenizer encodes


@dataclass(frozen=True)
class TokenizerEntry:
    kind: str
    config: type[TokenizerConfig]
    cls: type[Tokenizer]


TOKENIZER_REGISTRY: dict[str, TokenizerEntry] = {}


def register_tokenizer(
    kind: str, *, config: type[TokenizerConfig]
) -> Callable[[type[Tokenizer]], type[Tokenizer]]:
    """Class decorator: make `kind` usable as `tokenizer: {kind: ...}` in a run config."""

    def decorate(cls: type[Tokenizer]) -> type[Tokenizer]:
        if kind in TOKENIZER_REGISTRY:
            raise ValueError(f"tokenizer {kind!r} is registered twice")
        TOKENIZER_REGISTRY[kind] = TokenizerEntry(kind, config, cls)
        cls.kind = kind
        return cls

    return decorate


class CharTokenizerConfig(TokenizerConfig):
    """One token per character seen in the training text."""

    kind: Literal["char"] = "char"


class WordTokenizerConfig(TokenizerConfig):
    """Words split on whitespace, optionally lowercased and stripped of punctuation (Keras-style)."""

    kind: Literal["word"] = "word"
    lowercase: bool = True
    filters: str = KERAS_FILTERS  # characters removed before splitting; "" keeps punctuation
    newline_token: bool = True  # a line end becomes an <eos> token (and decodes back to "\n")
    min_freq: PositiveInt = 1
    max_vocab: PositiveInt | None = None


class BpeTokenizerConfig(TokenizerConfig):
    """Byte-level BPE (GPT-2's), its merges learned from the corpus as the `tokenizers` library learns them:
    any text encodes."""

    kind: Literal["bpe"] = "bpe"
    vocab_size: Annotated[int, Field(ge=260)] = 1024
    min_freq: PositiveInt = 2


class Tokenizer:
    """Common interface: encode/decode, the vocabulary size and the special ids."""

    kind = "base"
    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3
    fits = True  # built from training text by `fit` (a pretrained model's tokenizer comes with the model)

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def unknown_pieces(self, text: str) -> list[str]:
        """Pieces of `text` this tokenizer cannot represent (they would become <unk>)."""
        return []

    @property
    def end_ids(self) -> tuple[int, ...]:
        """Ids that end a generated text: <eos> (a pretrained chat model may have more than one)."""
        return (self.eos_id,)

    def special_name(self, token_id: int) -> str:
        """The name of a special token that decodes to no text ("<eos>"); "" for other ids."""
        return SPECIALS[token_id] if token_id < len(SPECIALS) else ""

    @property
    def eos_is_text(self) -> bool:
        """Whether <eos> stands for text (a word tokenizer's line break) rather than the end of a text."""
        return False

    @property
    def never_generated(self) -> tuple[int, ...]:
        """Ids a model never writes: <pad>, <unk> and <bos> (<eos> ends a text, or is a line break)."""
        return (self.pad_id, self.unk_id, self.bos_id)

    @classmethod
    def fit(cls, text: str, config: Any) -> Tokenizer:
        """A tokenizer of this kind built from training text and its config section."""
        raise NotImplementedError

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> Tokenizer:
        """The tokenizer a `to_dict` payload (tokenizer.json) describes."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def payload(self) -> dict[str, Any]:
        """What tokenizer.json holds (and what identifies the tokenizer: equal payloads, equal ids)."""
        return {"format": FORMAT, "version": FORMAT_VERSION, "kind": self.kind, **self.to_dict()}

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.payload(), ensure_ascii=False))

    def __len__(self) -> int:
        return self.vocab_size


class VocabTokenizer(Tokenizer):
    """Shared code of the char and word tokenizers: an explicit token <-> id table."""

    def __init__(self, tokens: list[str]) -> None:
        self.itos = list(SPECIALS) + [t for t in tokens if t not in SPECIALS]
        self.stoi = {token: i for i, token in enumerate(self.itos)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)


@register_tokenizer("char", config=CharTokenizerConfig)
class CharTokenizer(VocabTokenizer):
    """One id per character; characters never seen in training map to <unk>."""

    @classmethod
    def fit(cls, text: str, config: Any = None) -> CharTokenizer:
        return cls(sorted(set(text)))

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> CharTokenizer:
        return cls(payload["tokens"])

    def encode(self, text: str) -> list[int]:
        get, unk = self.stoi.get, self.unk_id
        return [get(ch, unk) for ch in text]

    def decode(self, ids: Iterable[int]) -> str:
        itos, first, unk = self.itos, len(SPECIALS), self.unk_id
        # Special ids carry no text; <unk> shows as U+FFFD so a reader sees something was lost.
        return "".join(itos[i] if i >= first else ("\ufffd" if i == unk else "") for i in ids)

    def unknown_pieces(self, text: str) -> list[str]:
        return sorted({ch for ch in text if ch not in self.stoi})

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.itos[len(SPECIALS) :]}


@register_tokenizer("word", config=WordTokenizerConfig)
class WordTokenizer(VocabTokenizer):
    """Whitespace words, Keras-style: optional lowercasing and punctuation filtering, <unk> for rare words.

    With `newline_token`, each line end is an <eos> token that decodes back to a newline, so a
    generated text keeps its line structure.
    """

    def __init__(self, tokens: list[str], *, lowercase: bool, filters: str, newline_token: bool) -> None:
        super().__init__(tokens)
        self.lowercase, self.filters, self.newline_token = lowercase, filters, newline_token
        self._table = str.maketrans(filters, " " * len(filters)) if filters else None
        self._pattern = re.compile(f"[{re.escape(filters)}]") if filters else None
        self._lookup = _Lookup(self.stoi, self.unk_id)
        self._lookup[MARK] = self.eos_id
        ascii_filters = filters.encode("ascii") if filters.isascii() else None
        self._bytes_table = (
            bytes.maketrans(ascii_filters, b" " * len(ascii_filters)) if ascii_filters else None
        )

    def words(self, text: str) -> list[str]:
        """Split text into word strings (before vocabulary lookup), with "<eos>" at line ends."""
        if self.lowercase:
            text = text.lower()
        if not self.newline_token:
            return self._split_line(text)
        out: list[str] = []
        lines = text.split("\n")
        for index, line in enumerate(lines):
            out.extend(self._split_line(line))
            if index < len(lines) - 1:
                out.append(EOS)
        return out

    def _split_line(self, line: str) -> list[str]:
        if self._table is not None:
            line = line.translate(self._table)
        return line.split()

    @classmethod
    def fit(cls, text: str, config: Any) -> WordTokenizer:
        return cls.from_counts(cls.splitter(config).count_words(text), config)

    @classmethod
    def splitter(cls, config: Any) -> WordTokenizer:
        """A tokenizer without a vocabulary that splits text into words as `config` says."""
        return cls([], lowercase=config.lowercase, filters=config.filters, newline_token=config.newline_token)

    def count_words(self, text: str) -> Counter[str]:
        """How often each word occurs in `text` (line ends not counted). Counts of texts cut at whitespace
        add up to the counts of the whole text."""
        marked = self.marked_words(text)
        counts = Counter(self.words(text) if marked is None else marked)
        counts.pop(EOS, None)
        if marked is not None:
            counts.pop(MARK, None)  # the line ends
        return counts

    @classmethod
    def from_counts(cls, counts: Counter[str], config: Any) -> WordTokenizer:
        """The vocabulary of `config` from word counts: the most frequent first, ties in string order."""
        ranked = sorted((w for w, c in counts.items() if c >= config.min_freq), key=lambda w: (-counts[w], w))
        if config.max_vocab is not None:
            ranked = ranked[: max(0, config.max_vocab - len(SPECIALS))]
        return cls(
            ranked, lowercase=config.lowercase, filters=config.filters, newline_token=config.newline_token
        )

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> WordTokenizer:
        return cls(
            payload["tokens"],
            lowercase=payload["lowercase"],
            filters=payload.get("filters", KERAS_FILTERS),
            newline_token=payload["newline_token"],
        )

    def encode(self, text: str) -> list[int]:
        marked = self.marked_words(text)
        if marked is None:
            get, unk = self.stoi.get, self.unk_id
            return [get(w, unk) for w in self.words(text)]
        return list(map(self._lookup.__getitem__, marked))

    def marked_words(self, text: str) -> list[str] | None:
        """words(text), line ends as MARK, in a few passes over the whole text instead of one per line
        (None when the text or the filters hold MARK: only words() tells those apart)."""
        if MARK in text or MARK in self.filters:
            return None
        if self.lowercase:
            text = text.lower()
        if self.newline_token:
            text = text.replace("\n", f" {MARK} ")
        if self._bytes_table is not None:  # ASCII filters: a byte table over the UTF-8 (no multibyte
            text = text.encode("utf-8").translate(self._bytes_table).decode("utf-8")  # char has ASCII bytes)
        elif self._pattern is not None:
            text = self._pattern.sub(" ", text)
        return text.split()

    def decode(self, ids: Iterable[int]) -> str:
        pieces: list[str] = []
        for i in ids:
            if i == self.eos_id and self.newline_token:
                pieces.append("\n")
            elif i == self.unk_id or i >= len(SPECIALS):
                word = self.itos[i]
                pieces.append(word if not pieces or pieces[-1] == "\n" else " " + word)
        return "".join(pieces)

    def unknown_pieces(self, text: str) -> list[str]:
        return sorted({w for w in self.words(text) if w not in self.stoi})

    @property
    def eos_is_text(self) -> bool:
        return self.newline_token

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.itos[len(SPECIALS) :],
            "lowercase": self.lowercase,
            "filters": self.filters,
            "newline_token": self.newline_token,
        }


class _Lookup(dict[str, int]):
    """A word -> id table where a missing word is <unk> (looked up in C: `map(table.__getitem__, words)`)."""

    def __init__(self, table: dict[str, int], unk: int) -> None:
        super().__init__(table)
        self.unk = unk

    def __missing__(self, key: str) -> int:
        return self.unk


@register_tokenizer("bpe", config=BpeTokenizerConfig)
class BpeTokenizer(Tokenizer):
    """Byte-level BPE from the `tokenizers` library: every string encodes, and decodes back exactly."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        # Text that spells a special token ("<unk>", "<eos>", ...) is ordinary text, not that id;
        # otherwise it would decode to nothing. (Not stored by to_str(), so set on every load.)
        self.backend.encode_special_tokens = True

    @classmethod
    def fit(cls, text: str, config: Any) -> BpeTokenizer:
        from lmzoo.data.bpe_trainer import count_pretokens

        return cls.from_counts(count_pretokens([text]), config)

    @classmethod
    def from_counts(cls, counts: Counter[str], config: Any) -> BpeTokenizer:
        """The tokenizer learned from how often each pre-token occurs in the training text."""
        from lmzoo.data.bpe_trainer import train_bpe  # numpy and the library: loaded when used

        return cls(train_bpe(counts, config, SPECIALS))

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> BpeTokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(payload["backend"]))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([i for i in ids if i >= len(SPECIALS)], skip_special_tokens=True)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend.to_str()}


def fit_tokenizer(config: TokenizerConfig, text: str) -> Tokenizer:
    """Build the tokenizer described by the config's `tokenizer:` section from training text."""
    if not text.strip():
        raise DataError("cannot fit a tokenizer on empty text")
    return TOKENIZER_REGISTRY[config.kind].cls.fit(text, config)


def tokenizer_from_dict(payload: dict[str, Any]) -> Tokenizer:
    if payload.get("format") != FORMAT:
        raise CheckpointError("not an lmzoo tokenizer file (missing format marker)")
    if payload.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"tokenizer format version {payload.get('version')} is newer than this lmzoo "
            f"understands ({FORMAT_VERSION}); upgrade lmzoo"
        )
    entry = TOKENIZER_REGISTRY.get(payload.get("kind"))  # type: ignore[arg-type]
    if entry is None:
        raise CheckpointError(f"unknown tokenizer kind {payload.get('kind')!r}")
    return entry.cls.from_dict(payload)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer.json written by `Tokenizer.save` (plain JSON: nothing is executed)."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"tokenizer file not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a tokenizer JSON file ({err})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a tokenizer JSON file")
    try:
        return tokenizer_from_dict(payload)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    except Exception as err:  # a damaged file: name it instead of showing a traceback
        raise CheckpointError(f"{path}: corrupt tokenizer file ({type(err).__name__}: {err})") from None
