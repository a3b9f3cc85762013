"""Byte-level BPE fitted from pre-token counts: the library trainer's merges, the counts of the fit sample,
and a corpus fitted while it is encoded giving the files of fitting first."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmzoo.config.schema import DataConfig
from lmzoo.data import bpe_pass, one_pass
from lmzoo.data import prepare as prepare_module
from lmzoo.data import sample as sample_module
from lmzoo.data.bpe_pass import BPE_PASS
from lmzoo.data.bpe_trainer import learn_merges
from lmzoo.data.corpus import plan_corpus
from lmzoo.data.prepare import prepare_corpus, split_text
from lmzoo.data.pretokens import pretokens
from lmzoo.data.scan import scanned
from lmzoo.data.sources import Piece
from lmzoo.data.tokenizer import SPECIALS, BpeTokenizer, BpeTokenizerConfig, WordTokenizerConfig
from lmzoo.data.word_pass import WORD_PASS

ROOT = Path(__file__).resolve().parent.parent
CORPORA = ROOT / "lmzoo" / "corpora"


def library_fit(text: str, vocab_size: int, min_frequency: int) -> Backend:
    """BPE as the `tokenizers` library's own trainer fits it on `text` (one sequence: split as a whole)."""
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([text], trainer=trainer)
    return backend


def code_like(seed: int, lines: int) -> str:
    """Indented, repetitive lines: pairs that merges make again and again, ties between equal counts."""
    rng = random.Random(seed)
    words = ["self", "def", "return", "x", "xx", "aaa", "ab", "abab", "_", "(", ")", ":", "==", "  "]
    return "".join(
        " " * rng.choice([0, 4, 8]) + " ".join(rng.choices(words, k=6)) + "\n" for _ in range(lines)
    )


TEXTS = {
    "shakespeare": (CORPORA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:60_000],
    "german": (CORPORA / "tatoeba_deu_eng" / "train.de").read_text(encoding="utf-8")[:60_000],
    "code": code_like(0, 1500),
    "repeats": "aaaa aaa aa a aaaaaaa abab ababab bababa aaaaab\n" * 40,
    "scripts": "日本語のテキスト 😀😀 emoji mixed ünïcödé \u0378 \t\t x\n" * 60,
}


@pytest.mark.parametrize("name", TEXTS)
@pytest.mark.parametrize(("vocab_size", "min_frequency"), [(300, 1), (700, 2), (3000, 2), (900, 5)])
def test_merges_learned_from_counts_are_the_library_trainers(name, vocab_size, min_frequency):
    """The whole tokenizer (vocabulary, merges in order, specials, pre-tokenizer) as the library writes it."""
    text = TEXTS[name]
    config = BpeTokenizerConfig(vocab_size=vocab_size, min_freq=min_frequency)
    ours = BpeTokenizer.fit(text, config).backend.to_str()
    assert ours == library_fit(text, vocab_size, min_frequency).to_str()


def test_the_merges_do_not_depend_on_the_order_of_the_counts():
    counts = Counter(pretokens(TEXTS["code"] + TEXTS["repeats"]))
    shuffled = list(counts.items())
    random.Random(1).shuffle(shuffled)
    assert learn_merges(counts, 900, 2, SPECIALS) == learn_merges(dict(shuffled), 900, 2, SPECIALS)


PIECES = ["ab", " ", "  ", "\n", "\n\n", " \n", "x", "'s", "é", "12", "!", "\t", "日本"]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.lists(st.sampled_from(PIECES), max_size=16).map("".join), min_size=1, max_size=4),
    st.data(),
)
def test_pretokens_numbered_in_one_pass_are_encodings_and_the_fits(texts, data):
    """Numbers stand for the text's pre-tokens; counts are those of each counted part split on its own,
    whether or not a part ends where the text's pre-tokens end."""
    parts, expected = [], Counter()
    for text in texts:
        cuts = sorted(set(data.draw(st.lists(st.integers(0, len(text)), max_size=3))) - {0, len(text)})
        bounds = [0, *cuts, len(text)]
        flags = data.draw(st.lists(st.booleans(), min_size=len(bounds) - 1, max_size=len(bounds) - 1))
        parts.append([(a, b, flag) for a, b, flag in zip(bounds[:-1], bounds[1:], flags, strict=True)])
        for a, b, flag in parts[-1]:
            expected.update(pretokens(text[a:b]) if flag else [])
    distinct, arrays, counts = bpe_pass.number_pretokens(texts, parts)
    for text, ids in zip(texts, arrays, strict=True):
        assert [distinct[i - 1] for i in ids] == pretokens(text)
    assert {distinct[i - 1]: int(c) for i, c in enumerate(counts) if c} == dict(expected)


def write_jsonl(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def _documents(folder: Path) -> list[str]:
    lines = code_like(3, 300).splitlines(keepends=True)
    documents = ["".join(lines[i : i + 12]) for i in range(0, len(lines), 12)] + ["x  \n", "  y"]
    return [write_jsonl(folder / "c.jsonl", documents)]


def _files(folder: Path) -> list[str]:
    for i in range(12):
        _write(folder / "d" / f"{i:02}.txt", code_like(i, 40))
    return [str(folder / "d")]


BPE_CORPORA = {
    "lines": (lambda d: [_write(d / "a.txt", TEXTS["shakespeare"][:20_000])], {}, {}),
    "documents, a text separator": (
        _documents,
        {"split_by": "documents", "document_end": "\n  \n", "split": (0.7, 0.3, 0.0)},
        {},
    ),
    "token tail, all splits": (
        lambda d: [_write(d / "a.txt", TEXTS["german"][:15_000])],
        {"split_by": "tokens"},
        {"fit_on": "all"},
    ),
    # larger than tokenizer.fit_bytes: every k-th block, blocks that end inside indentation split again
    "a sample of indented lines": (
        lambda d: [_write(d / "a.txt", code_like(2, 800))],
        {},
        {"fit_bytes": 9000},
    ),
    "a sample of files": (_files, {"split": (0.5, 0.5, 0.0)}, {"fit_bytes": 6000}),
}


def in_two_passes(*args, **kwargs):
    raise one_pass.NotInOnePass


@pytest.mark.parametrize("case", BPE_CORPORA, ids=str)
@pytest.mark.parametrize("workers", [1, 2])
def test_bpe_fitted_while_encoding_gives_the_files_of_fitting_first(tmp_path, monkeypatch, case, workers):
    """A corpus is cut into pre-tokens once: the tokenizer and token files equal those of fitting first
    (pre-tokens counted in `workers` processes) and encoding after (the library's encoder)."""
    make, options, tokenizer_options = BPE_CORPORA[case]
    train = make(tmp_path)
    config = BpeTokenizerConfig(vocab_size=400, **tokenizer_options)
    monkeypatch.setattr(sample_module, "SAMPLE_BLOCK", 256)  # many sample blocks in a small corpus
    passes, real = [], prepare_module.encode_in_one_pass

    def one(*args, **kwargs):
        passes.append(1)
        return real(*args, **kwargs)

    found = []
    for name, encode in (("one", one), ("two", in_two_passes)):
        monkeypatch.setattr(prepare_module, "encode_in_one_pass", encode)
        data = DataConfig(train=train, cache_dir=str(tmp_path / name), workers=workers, **options)
        found.append(prepare_corpus(data, config, say=lambda _: None))
    one_pass_corpus, two_pass_corpus = found
    assert passes == [1]
    assert one_pass_corpus.tokenizer.payload() == two_pass_corpus.tokenizer.payload()
    assert one_pass_corpus.tokenizer.vocab_size > 300
    assert one_pass_corpus.manifest["splits"] == two_pass_corpus.manifest["splits"]
    for split in ("train", "val", "test"):
        assert np.array_equal(one_pass_corpus.tokens(split), two_pass_corpus.tokens(split))
    assert not list((tmp_path / "one").rglob("*.words"))


def test_a_corpus_with_characters_only_the_library_places_is_fitted_first(tmp_path, monkeypatch):
    path = _write(tmp_path / "a.txt", "an unassigned \u0378 character\n" + "plain text here\n" * 30)
    fits, fit_first = [], prepare_module.fitted_tokenizer
    monkeypatch.setattr(
        prepare_module, "fitted_tokenizer", lambda *a, **k: fits.append(1) or fit_first(*a, **k)
    )
    data = DataConfig(train=path, cache_dir=str(tmp_path / "c"))
    corpus = prepare_corpus(data, BpeTokenizerConfig(vocab_size=300), say=lambda _: None)
    assert fits == [1]
    text = split_text(data, "train", 10**6)
    assert "\u0378" in text
    expected = BpeTokenizer.fit(text, BpeTokenizerConfig(vocab_size=300))
    assert corpus.tokenizer.payload() == expected.payload()
    assert corpus.tokens("train").tolist() == expected.encode(text)


@pytest.mark.parametrize(
    ("kind", "config"), [("word", WordTokenizerConfig()), ("bpe", BpeTokenizerConfig(vocab_size=300))]
)
def test_text_cut_inside_a_line_leaves_words_to_two_passes_and_bpe_in_one(tmp_path, kind, config):
    """A word fit counts the words of whole lines; BPE's counts the pre-tokens of each piece of text."""
    path = _write(tmp_path / "a.txt", "ab cd\n" * 40)
    corpus = scanned(
        plan_corpus(DataConfig(train=path, cache_dir=str(tmp_path / "c"))),
        verify=False,
        progress=False,
        say=lambda _: None,
    )
    pieces = [("train", Piece("ab c", False)), ("train", Piece("d ab\n", True)), ("val", Piece("cd\n", True))]
    corpus.route = lambda: iter(pieces)  # a piece that ends inside a line
    one = {"word": WORD_PASS, "bpe": BPE_PASS}[kind]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    if kind == "word":
        with pytest.raises(one_pass.NotInOnePass):
            one_pass.encode_in_one_pass(corpus, config, scratch, one, workers=1, progress=False)
    else:
        tokenizer, vocabulary, _ = one_pass.encode_in_one_pass(
            corpus, config, scratch, one, workers=1, progress=False
        )
        assert vocabulary.counted() == dict(Counter(pretokens("ab c") + pretokens("d ab\n")))
