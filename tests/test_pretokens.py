"""Byte-level BPE pre-tokenizing in Python: the library's pre-tokens on text of every script, and the
encoder built on it gives the library's ids."""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from lmzoo.data import pretokens as pretokens_module
from lmzoo.data.encoders import encoder_for
from lmzoo.data.pretokens import OTHER_SPACE, pretokens
from lmzoo.data.tokenizer import BpeTokenizerConfig, fit_tokenizer

SPLIT = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
BYTES = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


def library_pretokens(text: str) -> list[str]:
    """The library's pre-tokens, as byte-level strings."""
    return [piece for piece, _ in SPLIT.pre_tokenize_str(text)]


def as_bytes(pieces: list[str]) -> list[str]:
    return [BYTES.pre_tokenize_str(piece)[0][0] for piece in pieces]


def probe(char: str) -> str:
    """`char` beside letters, digits, spaces, apostrophes and itself: where its class decides the cuts."""
    return f"a{char}a 1{char}1 {char}{char} x{char}' {char}s '{char} \t{char} {char}\n"


def sampled_characters() -> list[str]:
    """Every 17th assigned code point, and all of Latin-1, General Punctuation and the other spaces."""
    codes = set(range(0x80, 0x100)) | set(range(0x2000, 0x2070)) | set(range(0x80, 0x110000, 17))
    chars = {chr(c) for c in codes} | OTHER_SPACE
    return sorted(c for c in chars if unicodedata.category(c) not in ("Cn", "Cs"))


def test_characters_of_every_script_are_cut_as_the_library_cuts_them():
    chars = sampled_characters()
    assert len(chars) > 15_000
    for start in range(0, len(chars), 2048):
        text = "".join(probe(c) for c in chars[start : start + 2048])
        found = pretokens(text)
        assert found is not None and "".join(found) == text
        assert as_bytes(found) == library_pretokens(text), f"characters from {chars[start]!r}"


def test_text_with_a_character_python_does_not_know_is_left_to_the_library():
    assert pretokens("abc \u0378 def") is None  # unassigned
    assert pretokens("abc \uffff") is None
    assert pretokens("") == [] and pretokens("a b") == ["a", " b"]


def test_other_unicode_data_keeps_only_the_classes_unchanged_since_unicode_3_2(monkeypatch):
    pretokens_module.shapes.cache_clear()
    monkeypatch.setattr(pretokens_module, "VERIFIED_UNICODE", "not this one")
    try:
        assert pretokens("é\u00a0x") == ["é", "\u00a0", "x"]
        assert pretokens("a\u0237") is None  # a letter since Unicode 4.1: not where 3.2 put it
        assert pretokens("a\U0001f600") == ["a", "\U0001f600"]  # a symbol, and unassigned in 3.2: alike
    finally:
        monkeypatch.undo()
        pretokens_module.shapes.cache_clear()
    assert pretokens("a\u0237") == ["a\u0237"]


ALPHABET = list("ab Z09'sltrevmd.,!-_\t\n\r\x0b\x0c\x1c\x1f\x00") + [
    "é", "ß", "Σ", "ς", "ж", "ا", "א", "中", "文", "ー", "한", "\u0301", "\u0903", "²", "½", "Ⅻ", "٣", "०",
    "\xa0", "\x85", "\u2028", "\u3000", "\u200b", "\u2009", "\u202f", "’", "“", "€", "™", "😀", "\U0001f1fa",
    "\ufeff", "\ue000", "\u0378", "\uffff", "𝔸",
]  # fmt: skip


@pytest.fixture(scope="module")
def bpe():
    sample = "".join(ALPHABET) * 3 + " the cat's ß 中文 ½ a\u0301 😀\n" * 20
    return fit_tokenizer(BpeTokenizerConfig(vocab_size=300, min_freq=1), sample)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([*ALPHABET, "the", " cat", "'s", "  ", "\n\n"]), max_size=60))
def test_the_bpe_encoder_gives_the_librarys_ids_on_text_of_every_script(bpe, parts):
    text = "".join(parts)
    found = pretokens(text)
    if found is not None:
        assert "".join(found) == text and as_bytes(found) == library_pretokens(text)
    encoder = encoder_for(bpe, np.uint16)
    assert encoder([text])[0].tolist() == bpe.encode(text)
    assert encoder([text * 2])[0].tolist() == bpe.encode(text * 2)  # pieces remembered from before
