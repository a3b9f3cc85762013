"""`lmzoo tokenize`: a run's tokens, and --compare (char, word and BPE fitted on one training split,
measured on its validation split)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import TINY_TEXT
from test_inspect import assert_one_error_line
from typer.testing import CliRunner

from lmzoo.analysis.tokenizer_compare import compare_tokenizers, sample_line, standard_tokenizers
from lmzoo.cli import app
from lmzoo.config.schema import DataConfig
from lmzoo.data.prepare import split_text


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TINY_TEXT + "an owl flew over the barn.\n" * 5, encoding="utf-8")
    return path


def test_compare_measures_each_tokenizer_on_the_validation_split(corpus):
    data = DataConfig(train=str(corpus), split=(0.9, 0.1, 0.0))
    rows, line = compare_tokenizers(data, standard_tokenizers((300,)))
    splits = SimpleNamespace(**{name: split_text(data, name, 1 << 30) for name in ("train", "val")})
    assert line == sample_line(splits.val) == "an owl flew over the barn."
    char, word, bpe = rows
    assert [r.name for r in rows] == ["char", "word", "bpe 300"]
    assert char.vocab_size == 4 + len(set(splits.train))
    assert char.chars_per_token == pytest.approx(1.0)
    known = set(splits.train)
    assert char.sample == [("\u2423" if c == " " else c) if c in known else "<unk>" for c in line]
    assert char.unknown_share == pytest.approx(sum(c not in known for c in splits.val) / len(splits.val))
    assert char.unknown_share > 0  # w, l, f, v never occur in training
    # "an owl flew over the barn." lives in validation only: of its 6 words only "the" is known,
    # and each validation line ends in one <eos> token (7 tokens per line)
    assert word.unknown_share == pytest.approx(5 / 7)
    assert word.chars_per_token == pytest.approx(len(splits.val) / (7 * splits.val.count("\n")))
    assert word.sample == ["<unk>", "<unk>", "<unk>", "<unk>", "the", "<unk>"]
    assert bpe.vocab_size <= 300 and bpe.unknown_share == 0.0 and bpe.chars_per_token > 1.0
    assert "".join(bpe.sample).replace("\u2423", " ") == line
    assert all(r.chars_per_second > 0 for r in rows)


def test_tokenize_compare_prints_the_table(corpus):
    result = CliRunner().invoke(
        app, ["tokenize", "--compare", "--data", str(corpus), "--bpe-size", "300", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    for name in ("char", "word", "bpe 300", "chars/token", "sample line"):
        assert name in result.stdout


def test_tokenize_shows_a_runs_tokens(trained_run):
    result = CliRunner().invoke(app, ["tokenize", "--run", str(trained_run), "--text", "the cat"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "t|h|e|\u2423|c|a|t"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--compare", "--data", "missing.txt"], "missing.txt"),
        (["--compare", "--bpe-size", "100"], "--bpe-size 100: vocab_size"),
        ([], "pass --text T"),
    ],
)
def test_bad_tokenize_input_is_one_line(args, message):
    result = CliRunner().invoke(app, ["tokenize", *args])
    assert message in assert_one_error_line(result)
