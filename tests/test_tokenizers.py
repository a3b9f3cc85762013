"""Char, word and byte-level BPE tokenizers: exact round trips, vocab rules, save/load."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_TEXT
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lmzoo.data.tokenizer import (
    BpeTokenizer,
    BpeTokenizerConfig,
    CharTokenizer,
    CharTokenizerConfig,
    WordTokenizer,
    WordTokenizerConfig,
    fit_tokenizer,
    load_tokenizer,
)
from lmzoo.errors import CheckpointError, DataError

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ALPHABET = sorted(set(TINY_TEXT))


@pytest.fixture(scope="module")
def char_tok() -> CharTokenizer:
    return fit_tokenizer(CharTokenizerConfig(), TINY_TEXT)


@pytest.fixture(scope="module")
def bpe_tok() -> BpeTokenizer:
    return fit_tokenizer(BpeTokenizerConfig(vocab_size=300, min_freq=2), TINY_TEXT)


def word_tok(text: str = TINY_TEXT, **options) -> WordTokenizer:
    return fit_tokenizer(WordTokenizerConfig(**options), text)


# ---- char --------------------------------------------------------------------------------------


def test_char_vocabulary_is_specials_then_sorted_characters(char_tok):
    assert char_tok.itos[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert char_tok.itos[4:] == ALPHABET
    assert char_tok.vocab_size == 4 + len(ALPHABET) == len(char_tok)
    assert (char_tok.pad_id, char_tok.unk_id, char_tok.bos_id, char_tok.eos_id) == (0, 1, 2, 3)
    assert char_tok.encode("a") == [4 + ALPHABET.index("a")]


@FAST
@given(text=st.text(alphabet=ALPHABET, max_size=200))
def test_char_round_trip_on_training_alphabet(char_tok, text):
    ids = char_tok.encode(text)
    assert len(ids) == len(text)
    assert all(4 <= i < char_tok.vocab_size for i in ids)
    assert char_tok.decode(ids) == text


def test_char_unknown_characters_become_unk(char_tok):
    ids = char_tok.encode("aZb")
    assert ids[1] == char_tok.unk_id
    assert char_tok.decode(ids) == "a\ufffdb"
    assert char_tok.unknown_pieces("aZbQZ") == ["Q", "Z"]
    assert char_tok.unknown_pieces("the cat") == []
    # Special ids other than <unk> carry no text.
    assert char_tok.decode([0, 2, 3] + char_tok.encode("hi")) == "hi"


# ---- bpe -----------------------------------------------------------------------------------------


@FAST
@given(text=st.text(max_size=120))
@example("")
@example("naïve café 日本語 🎉 \x00 \t\r\n  double  spaces ")
@example("tokens look like <unk> and <pad> or <eos>, <bos>")  # literal text, not the special ids
def test_bpe_round_trip_on_any_text(bpe_tok, text):
    ids = bpe_tok.encode(text)
    assert all(0 <= i < bpe_tok.vocab_size for i in ids)
    assert bpe_tok.decode(ids) == text


def test_bpe_learns_merges(bpe_tok):
    assert 260 < bpe_tok.vocab_size <= 300  # vocab_size is an upper bound on a tiny corpus
    # Frequent words compress well below one token per byte.
    text = "the cat sat on the mat."
    assert len(bpe_tok.encode(text)) < len(text.encode("utf-8")) / 2


@FAST
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_bpe_ids_stay_in_vocab_range(bpe_tok, text):
    assert all(0 <= i < bpe_tok.vocab_size for i in bpe_tok.encode(text))


# ---- word ------------------------------------------------------------------------------------------


def test_word_keras_style_lowercase_and_punctuation_filter():
    tok = word_tok("Hello, World! hello... (world) 'quoted' tab\there\n")
    assert tok.words("Hello, World! It's A-OK.") == ["hello", "world", "it's", "a", "ok"]
    assert tok.words("a\nb") == ["a", "<eos>", "b"]
    # Most frequent first, ties alphabetical, after the four specials.
    assert tok.itos[4:6] == ["hello", "world"]
    assert tok.encode("HELLO world") == [4, 5]
    assert tok.decode(tok.encode("Hello,   World!\nhello")) == "hello world\nhello"


def test_word_options_keep_case_and_punctuation():
    tok = word_tok("Hi, there. Hi, you.", lowercase=False, filters="", newline_token=False)
    assert tok.words("Hi, there.\nYou") == ["Hi,", "there.", "You"]
    assert tok.itos[4] == "Hi,"
    assert tok.stoi.get("hi,") is None


def test_word_min_freq_and_max_vocab():
    text = "a a a a b b b c c d\n"
    assert word_tok(text).itos[4:] == ["a", "b", "c", "d"]
    assert word_tok(text, min_freq=2).itos[4:] == ["a", "b", "c"]
    assert word_tok(text, min_freq=3).itos[4:] == ["a", "b"]
    capped = word_tok(text, max_vocab=6)
    assert capped.vocab_size == 6 and capped.itos[4:] == ["a", "b"]


def test_word_unknown_words_map_to_unk():
    tok = word_tok("a a b\n", min_freq=2)
    assert tok.encode("a b zebra") == [4, tok.unk_id, tok.unk_id]
    assert tok.decode(tok.encode("a b zebra")) == "a <unk> <unk>"
    assert tok.unknown_pieces("a b zebra") == ["b", "zebra"]


def test_word_newline_token_round_trips_lines():
    tok = word_tok(TINY_TEXT)
    text = "the cat sat on the mat\nthe dog ate the bone\n"
    ids = tok.encode(text)
    assert ids.count(tok.eos_id) == 2
    assert tok.decode(ids) == text


# ---- save / load / errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        CharTokenizerConfig(),
        WordTokenizerConfig(),
        WordTokenizerConfig(lowercase=False, filters="", newline_token=False, min_freq=2, max_vocab=12),
        BpeTokenizerConfig(vocab_size=290, min_freq=2),
    ],
    ids=["char", "word", "word-options", "bpe"],
)
def test_save_load_round_trip_gives_identical_encodings(tmp_path, config):
    tok = fit_tokenizer(config, TINY_TEXT)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    payload = json.loads(path.read_text(encoding="utf-8"))
    assert payload["format"] == "lmzoo.tokenizer" and payload["kind"] == config.kind
    again = load_tokenizer(path)
    assert type(again) is type(tok)
    assert again.vocab_size == tok.vocab_size
    samples = [TINY_TEXT, "The Cat, unseen ZEBRA words!\nnew line", "", "日本語 <unk> \t x"]
    for text in samples:
        assert again.encode(text) == tok.encode(text)
        assert again.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert again.unknown_pieces("zebra Q") == tok.unknown_pieces("zebra Q")


def test_fit_on_blank_text_is_a_data_error():
    with pytest.raises(DataError, match="empty"):
        fit_tokenizer(CharTokenizerConfig(), "  \n\t")


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="not a tokenizer JSON"):
        load_tokenizer(garbage)
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"tokens": ["a"]}), encoding="utf-8")
    with pytest.raises(CheckpointError, match="format marker"):
        load_tokenizer(foreign)
    future = tmp_path / "future.json"
    future.write_text(json.dumps({"format": "lmzoo.tokenizer", "version": 99, "kind": "char", "tokens": []}))
    with pytest.raises(CheckpointError, match="newer"):
        load_tokenizer(future)
    damaged = tmp_path / "damaged.json"
    damaged.write_text(json.dumps({"format": "lmzoo.tokenizer", "version": 1, "kind": "word"}))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_tokenizer(damaged)
