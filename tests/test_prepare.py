"""Prepared corpora: inputs (files, globs, folders, JSONL, gzip, parquet, saved datasets), the token files
and their manifest, the cache, batches read from the memory map, and every bad input as one line."""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TEXT, base_config_dict, config_from_dict, load_run
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from lmzoo.cli import app
from lmzoo.config.schema import DataConfig
from lmzoo.data import fit as fit_module
from lmzoo.data import one_pass, token_files, word_pass
from lmzoo.data import prepare as prepare_module
from lmzoo.data import sample as sample_module
from lmzoo.data.corpus import plan_corpus
from lmzoo.data.encoders import encoder_for, in_workers, safe_pieces
from lmzoo.data.fit import _characters, _fitted_pieces, _plain_text, _raw_characters
from lmzoo.data.packed import PackedExamples
from lmzoo.data.prepare import prepare_corpus, split_text
from lmzoo.data.scan import scanned
from lmzoo.data.sources import Piece
from lmzoo.data.streams import RandomWindows, SequentialBatches
from lmzoo.data.tokenizer import (
    BpeTokenizerConfig,
    CharTokenizerConfig,
    WordTokenizer,
    WordTokenizerConfig,
    fit_tokenizer,
)
from lmzoo.errors import DataError, TrainingStopped
from lmzoo.training.loop import train

ROOT = Path(__file__).resolve().parent.parent
TOKENIZERS = [CharTokenizerConfig(), WordTokenizerConfig(), BpeTokenizerConfig(vocab_size=300)]
TEXT = TINY_TEXT + "an owl flew over the barn.\n" * 5


def quiet(_: str) -> None:
    pass


def prepared(data: DataConfig, tokenizer=None, **options):
    return prepare_corpus(data, tokenizer or CharTokenizerConfig(), say=quiet, **options)


def one_line_error(call) -> str:
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- the same tokens and batches as the text in memory -------------------------------------------------


@pytest.mark.parametrize("config", TOKENIZERS, ids=lambda c: c.kind)
def test_prepared_batches_equal_the_batches_of_the_text_in_memory(tmp_path, config):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    lines = TEXT.splitlines(keepends=True)
    train_text, val_text = "".join(lines[:45]), "".join(lines[45:])  # round(50 * 0.9)
    corpus = prepared(DataConfig(train=str(path), split=(0.9, 0.1, 0.0)), config)
    reference = fit_tokenizer(config, train_text)
    assert corpus.tokenizer.payload() == reference.payload()
    train_ids, val_ids = torch.tensor(reference.encode(train_text)), torch.tensor(reference.encode(val_text))
    assert torch.equal(corpus.tensor("train").long(), train_ids)
    assert torch.equal(corpus.tensor("val").long(), val_ids)
    assert corpus.manifest["dtype"] == "uint16" and corpus.tokens("train").dtype == np.uint16
    for make in (
        lambda s: RandomWindows(s, 3, 7, seed=5),
        lambda s: SequentialBatches(s, 3, 7),
    ):
        mapped, memory = make(corpus.tokens("train")), make(train_ids)
        for _ in range(2 * len(memory) + 1):  # past an epoch boundary
            a, b = mapped.next(), memory.next()
            assert a.inputs.dtype == torch.long and torch.equal(a.inputs, b.inputs)
            assert torch.equal(a.targets, b.targets) and a.starts_epoch == b.starts_epoch


def test_a_word_vocabulary_counted_in_worker_processes_is_the_one_fitted_in_one(tmp_path, monkeypatch):
    """Large corpora count their words in every core's process, in jobs cut at whitespace."""
    tricky = ["ΟΔΟΣ Σ <eos> a\tb\x00c \x00", "well, well; WELL.", "x" * 90, "the barn\n\nthe owl"]
    texts = [line for line in TEXT.splitlines() if line.strip()] + tricky * 3
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    jobs = []

    def spy(function, items, *args):
        counted = ((tag, jobs.append(len(text)) or text) for tag, text in items)
        return in_workers(function, counted, *args)

    monkeypatch.setattr(fit_module, "JOB_CHARS", 64)  # many jobs
    monkeypatch.setattr(fit_module, "in_workers", spy)
    monkeypatch.setattr(prepare_module, "encode_in_one_pass", in_two_passes)  # fitted first, then encoded
    for config in (WordTokenizerConfig(), WordTokenizerConfig(lowercase=False, filters="", min_freq=2)):
        found = []
        for workers in (1, 2):
            cache = str(tmp_path / f"cache-{workers}")
            data = DataConfig(train=str(path), split=(0.9, 0.1, 0.0), split_by="documents", cache_dir=cache)
            found.append(prepared(data, config, workers=workers))
        assert found[1].tokenizer.payload() == found[0].tokenizer.payload()
        assert found[0].tokenizer.vocab_size > 20
        assert torch.equal(found[1].tensor("train"), found[0].tensor("train"))
    assert len(jobs) > 10


LINES = TEXT.splitlines()
WORD_CORPORA = {
    "lines": ({"a.txt": TEXT + "ΟΔΟΣ <eos> <pad> the\n" + "only in validation\n" * 5}, {}, {}),
    "line ends marked by <eos>": ({"a.txt": "a\x00b the\nowl \x00 a\n" * 30}, {}, {"min_freq": 2}),
    "documents": (
        {"c.jsonl": "".join(json.dumps({"text": t}) + "\n" for t in TEXT.splitlines() if t.strip())},
        {"split_by": "documents", "document_end": "the end\n"},
        {"max_vocab": 30, "lowercase": False},
    ),
    "token tail, all splits": ({"a.txt": TEXT}, {"split_by": "tokens"}, {"fit_on": "all", "filters": ""}),
    "a validation file": (
        {"a.txt": TEXT, "v.txt": "barn owl unseen\n"},
        {"val": "v.txt", "split": (0.8, 0, 0.2)},
        {},
    ),
    # larger than tokenizer.fit_bytes: every k-th block of the text, until fit_bytes characters are taken
    # the first half of the files is most of the text: the sample reaches fit_bytes before its end
    "a sample of files": (
        {
            f"d/{i:02}.txt": (" ".join(f"w{i}x{j}" for j in range(50)) + "\n" if i < 10 else "v\n")
            for i in range(20)
        },
        {"split": (0.5, 0.5, 0.0)},
        {"fit_bytes": 600},
    ),
    "a sample of lines": (
        {"a.txt": TEXT * 12 + "".join(f"w{i}\n" for i in range(300))},
        {},
        {"fit_bytes": 4000},
    ),
    "a sample of documents": (
        {
            "c.jsonl": "".join(
                json.dumps({"text": f"{t} d{i % 50}"}) + "\n" for i, t in enumerate(TEXT.splitlines() * 4)
            )
        },
        {"split_by": "documents"},
        {"fit_bytes": 1800},
    ),
}


def in_two_passes(*args, **kwargs):
    raise one_pass.NotInOnePass


@pytest.mark.parametrize("case", WORD_CORPORA, ids=str)
@pytest.mark.parametrize("workers", [1, 2])
def test_a_word_vocabulary_fitted_while_encoding_gives_the_files_of_fitting_first(
    tmp_path, monkeypatch, case, workers
):
    """A corpus is split into words once: the tokenizer (on all of the text or on the fit sample) and the
    token files equal those of fitting first and encoding after."""
    files, options, tokenizer_options = WORD_CORPORA[case]
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    train = (
        [str(tmp_path / "d")] if "d/00.txt" in files else [str(tmp_path / n) for n in files if n != "v.txt"]
    )
    options = {**options, "val": str(tmp_path / options["val"])} if "val" in options else options
    config = WordTokenizerConfig(**tokenizer_options)
    monkeypatch.setattr(sample_module, "SAMPLE_BLOCK", 64)  # many sample blocks in a small corpus
    passes = []
    real = prepare_module.encode_in_one_pass

    def one_pass(*args, **kwargs):
        passes.append(1)
        return real(*args, **kwargs)

    found = []
    for name, encode in (("one", one_pass), ("two", in_two_passes)):
        monkeypatch.setattr(prepare_module, "encode_in_one_pass", encode)
        data = DataConfig(train=train, cache_dir=str(tmp_path / name), workers=workers, **options)
        found.append(prepared(data, config))
    assert passes == [1]
    one, two = found
    assert one.tokenizer.payload() == two.tokenizer.payload() and one.tokenizer.vocab_size > 6
    assert one.manifest["splits"] == two.manifest["splits"] and one.manifest["dtype"] == two.manifest["dtype"]
    for split in ("train", "val", "test"):
        assert np.array_equal(one.tokens(split), two.tokens(split))
    assert not list((tmp_path / "one").rglob("*.words"))  # the provisional files are gone
    monkeypatch.setattr(prepare_module, "encode_in_one_pass", one_pass)
    data = DataConfig(train=train, cache_dir=str(tmp_path / "one"), workers=workers, **options)
    assert not prepared(data, config).fresh and passes == [1]  # the fitted tokenizer was kept


def test_text_cut_inside_a_line_is_fitted_first_and_encoded_after(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_text(TEXT, encoding="utf-8")
    data = DataConfig(train=str(path), cache_dir=str(tmp_path / "c"))
    fitted = sample_module.FitSample(
        scanned(plan_corpus(data), verify=False, progress=False, say=quiet), WordTokenizerConfig()
    )
    jobs = iter([([("train", False, 3), ("train", True, 2), ("val", True, 2)], ["ab\n", "cd", "ef"])])
    assert list(fitted.flag(jobs))[0][1][1] == [[(0, 3, True)], [(0, 2, True)], [(0, 2, False)]]
    assert not fitted.cut_line
    list(fitted.flag(iter([([("train", False, 2)], ["ab"])])))
    assert fitted.cut_line
    monkeypatch.setattr(prepare_module, "encode_in_one_pass", in_two_passes)
    corpus = prepared(data, WordTokenizerConfig())
    reference = fit_tokenizer(WordTokenizerConfig(), "".join(TEXT.splitlines(keepends=True)[:45]))
    assert corpus.tokenizer.payload() == reference.payload()


def test_a_corpus_of_too_many_words_or_a_thin_sample_is_fitted_first(tmp_path, monkeypatch):
    """The one pass holds every distinct word of the corpus: past MOST_WORDS it gives way to two passes
    (memory stays bounded), as it does where the fit sample is a small share of the text."""
    path = tmp_path / "a.txt"
    path.write_text(TEXT, encoding="utf-8")
    reference = fit_tokenizer(WordTokenizerConfig(), "".join(TEXT.splitlines(keepends=True)[:45]))
    monkeypatch.setattr(one_pass, "MOST_WORDS", 8)
    fits, fit_first = [], prepare_module.fitted_tokenizer
    monkeypatch.setattr(
        prepare_module, "fitted_tokenizer", lambda *a, **k: fits.append(1) or fit_first(*a, **k)
    )
    corpus = prepared(DataConfig(train=str(path), cache_dir=str(tmp_path / "c")), WordTokenizerConfig())
    assert fits == [1]
    assert corpus.tokenizer.payload() == reference.payload() and reference.vocab_size > 8
    assert not list((tmp_path / "c").rglob("*.words")) and not list((tmp_path / "c").rglob("scratch*"))
    scan = scanned(plan_corpus(DataConfig(train=str(path))), verify=False, progress=False, say=quiet)
    assert one_pass.in_one_pass(scan, WordTokenizerConfig())
    assert not one_pass.in_one_pass(scan, WordTokenizerConfig(fit_bytes=len(TEXT) // 5))


def test_a_word_vocabulary_of_blank_text_is_one_line_in_one_pass(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text('{"text": "  "}\n{"text": "\\n"}\n{"text": "a b"}\n', encoding="utf-8")
    data = DataConfig(
        train=str(path), split=(0.6, 0.4, 0.0), split_by="documents", cache_dir=str(tmp_path / "c")
    )
    assert (
        one_line_error(lambda: prepared(data, WordTokenizerConfig()))
        == "cannot fit a tokenizer on empty text"
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            list("ab \n\t\r\x0b\x1c.,'s1é\u00a0\u2028²") + ["ll", "  ", "all ", "'s", "'S", "<eos>"]
        ),
        min_size=10,
        max_size=150,
    )
)
def test_a_text_cut_at_safe_places_encodes_as_the_whole(parts):
    text = "".join(parts)
    for tokenizer in SAFE_CUT_TOKENIZERS:
        pieces = safe_pieces(text, 3)
        assert "".join(pieces) == text
        assert [i for piece in pieces for i in tokenizer.encode(piece)] == tokenizer.encode(text)
        # The fast encoders (BPE: ASCII pre-tokens by Python's regex, cached) give the same ids.
        [fast] = encoder_for(tokenizer, np.uint32)([text * 3])
        assert fast.tolist() == tokenizer.encode(text * 3)


SAFE_CUT_TOKENIZERS = [
    # merges across whitespace runs (" \n", "\n\n ", ...): a cut in the wrong place changes the ids
    fit_tokenizer(
        BpeTokenizerConfig(vocab_size=400, min_freq=1),
        "all the ball's a\n  ll's fall\tsé. a \nb\n\n all  ball\t\n's \n\n\t" * 20,
    ),
    fit_tokenizer(WordTokenizerConfig(), "all the ball's a\nll's fall"),
    fit_tokenizer(WordTokenizerConfig(newline_token=False, filters=""), "all the ball's a"),
]


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_resume_from_a_prepared_corpus_is_bit_identical(tmp_path, sampling):
    """8 steps straight == 4 steps, a stop, resume, 4 steps, on a folder of documents read from the map."""
    folder = tmp_path / "docs"
    (folder / "deep").mkdir(parents=True)
    for index in range(12):
        (folder / ("deep" if index % 2 else "") / f"{index:02}.txt").write_text(TEXT[index * 60 :], "utf-8")
    raw = base_config_dict(tmp_path / "runs", folder, name="gpt")
    raw["model"] = {"name": "gpt", "d_model": 16, "n_heads": 2, "n_layers": 1, "context_length": 8}
    raw["train"].update(max_steps=8, eval_every=4)
    raw["data"]["sampling"] = sampling
    straight: list[tuple[int, float]] = []
    whole = train(config_from_dict(raw), progress=False, on_step=lambda s, loss: straight.append((s, loss)))
    split: list[tuple[int, float]] = []

    def stop_at_four(step: int, loss: float) -> None:
        split.append((step, loss))
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    other = {**raw, "name": "split"}
    with pytest.raises(TrainingStopped):
        train(config_from_dict(other), progress=False, on_step=stop_at_four)
    resumed = train(
        config_from_dict(other), resume=True, progress=False, on_step=lambda s, loss: split.append((s, loss))
    )
    assert split == straight
    a, b = load_run(whole, "last").model.state_dict(), load_run(resumed, "last").model.state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)


# ---- inputs ------------------------------------------------------------------------------------------


def test_folders_globs_jsonl_and_gzip_are_documents_separated_by_eos(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha one\nalpha two\n", encoding="utf-8")
    (folder / "b" / "c.md").write_text("gamma\n", encoding="utf-8")
    with gzip.open(folder / "b" / "d.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write("delta zipped\n")
    records = [{"text": "epsilon"}, {"text": "zeta\nline"}, {"other": 1, "text": ""}]
    (folder / "e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    with gzip.open(folder / "f.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": "eta"}) + "\n")
    (folder / "empty.txt").write_text("", encoding="utf-8")  # skipped and counted
    (folder / "image.png").write_bytes(b"\x89PNG")  # not text: never read
    (folder / ".hidden.txt").write_text("never read\n", encoding="utf-8")
    data = DataConfig(train=str(folder), split=(0.5, 0.5, 0.0), split_by="tokens")
    corpus = prepared(data)
    stream = corpus.tokens("train").tolist() + corpus.tokens("val").tolist()
    text = "".join("|" if i == corpus.tokenizer.eos_id else corpus.tokenizer.itos[i] for i in stream)
    assert text == "alpha one\nalpha two\n|gamma\n|delta zipped\n|epsilon|zeta\nline|eta"
    assert corpus.manifest["skipped"] == [str(folder / "empty.txt")]
    assert len(corpus.manifest["sources"]["train"]) == 5
    # A glob picks the same files; a list of entries joins them in order.
    globbed = prepared(
        DataConfig(train=str(folder / "**" / "*.txt*"), split=(0.5, 0.5, 0.0), split_by="tokens")
    )
    ids = globbed.tokens("train").tolist() + globbed.tokens("val").tolist()
    assert globbed.tokenizer.decode(ids) == "alpha one\nalpha two\ndelta zipped\n"
    listed = prepared(
        DataConfig(train=[str(folder / "e.jsonl"), str(folder / "a.txt")], split=(0.5, 0.5, 0.0))
    )
    assert listed.manifest["boundaries"] == {
        "unit": "documents", "split": [0.5, 0.5, 0.0], "given": {"val": False, "test": False},
        "train": 2, "val": 2, "test": 0,
    }  # fmt: skip


def test_document_end_and_split_by_documents(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": f"doc{i}"}) + "\n" for i in range(10)), encoding="utf-8")
    data = DataConfig(train=str(path), text_field="body", document_end="\n\n", split=(0.8, 0.1, 0.1))
    corpus = prepared(data, CharTokenizerConfig(fit_on="all"))
    decode = corpus.tokenizer.decode
    assert decode(corpus.tokens("train").tolist()) == "\n\n".join(f"doc{i}" for i in range(8))
    assert (
        decode(corpus.tokens("val").tolist()) == "doc8" and decode(corpus.tokens("test").tolist()) == "doc9"
    )
    assert [corpus.manifest["splits"][s]["documents"] for s in ("train", "val", "test")] == [8, 1, 1]


def test_parquet_and_saved_datasets_are_read_through_the_extra(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"text": ["first row", "second row", None], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "rows.parquet")
    saved = tmp_path / "dataset"
    saved.mkdir()
    with pa.ipc.new_stream(str(saved / "data-00000-of-00001.arrow"), table.schema) as writer:
        writer.write_table(table)
    (saved / "dataset_info.json").write_text("{}", encoding="utf-8")
    (saved / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    for entry in (tmp_path / "rows.parquet", saved):
        corpus = prepared(DataConfig(train=str(entry), split=(0.5, 0.5, 0.0), split_by="tokens"))
        ids = corpus.tokens("train").tolist() + corpus.tokens("val").tolist()
        assert corpus.tokenizer.decode(ids) == "first rowsecond row"  # <eos> between rows decodes to ""
        assert ids.count(corpus.tokenizer.eos_id) == 1  # the empty third row adds nothing
    message = one_line_error(
        lambda: prepared(DataConfig(train=str(saved), text_field="body", split_by="tokens"))
    )
    assert "no 'body' column" in message and "text, n" in message


# ---- the cache: reuse, invalidation, atomic writes, concurrency ------------------------------------


def test_a_changed_source_is_noticed_and_prepared_again(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    data, notices = DataConfig(train=str(path)), []
    first = prepare_corpus(data, CharTokenizerConfig(), say=notices.append)
    assert first.fresh and not prepare_corpus(data, CharTokenizerConfig(), say=notices.append).fresh
    assert notices == []
    path.write_text(TEXT.replace("cat", "cow"), encoding="utf-8")
    changed = prepare_corpus(data, CharTokenizerConfig(), say=notices.append)
    assert changed.fresh and notices == [
        f"notice: {path} changed since the corpus was prepared; preparing it again"
    ]
    assert "w" in changed.tokenizer.stoi and "w" not in first.tokenizer.stoi
    # Same size and time, other content: only --verify (a rehash) sees it.
    stat = path.stat()
    path.write_text(TEXT.replace("cat", "cap"), encoding="utf-8")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert not prepare_corpus(data, CharTokenizerConfig(), say=notices.append).fresh
    verified = prepare_corpus(data, CharTokenizerConfig(), verify=True, say=notices.append)
    assert (
        verified.fresh
        and notices[-1] == f"notice: {path} has new content (same size and time); preparing it again"
    )
    assert "p" in verified.tokenizer.stoi


@pytest.mark.parametrize("config", [CharTokenizerConfig(), WordTokenizerConfig()], ids=lambda c: c.kind)
def test_a_full_disk_during_prepare_is_one_line_and_leaves_nothing_trusted(tmp_path, monkeypatch, config):
    """char writes its token files; word (fitted in one pass) its provisional files first."""
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT * 3, encoding="utf-8")
    data = DataConfig(train=str(path), cache_dir=str(tmp_path / "cache"))
    writes = []

    class FillingUp(io.FileIO):
        """A token file on a disk that is full after its first write (written by the writing thread)."""

        def write(self, data):
            writes.append(len(data))
            if len(writes) > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    monkeypatch.setattr(token_files, "open", FillingUp, raising=False)
    monkeypatch.setattr(token_files, "BATCH_CHARS", 500)  # several jobs: the disk fills after the first
    message = one_line_error(lambda: prepared(data, config))
    assert message.startswith("no space left for the prepared corpus") and "data.cache_dir" in message
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_dir()]
    assert len(leftovers) == 1 and not any(p.name.startswith("tok-") for p in (tmp_path / "cache").rglob("*"))
    assert not list((tmp_path / "cache").rglob("*.words"))
    monkeypatch.delattr(token_files, "open")
    assert prepared(data, config).fresh  # the next prepare starts clean and succeeds


def test_two_processes_preparing_at_once_prepare_it_once(tmp_path):
    corpus = tmp_path / "big.txt"
    corpus.write_text(TEXT * 2000, encoding="utf-8")  # ~2 MB: long enough to overlap
    config = tmp_path / "cfg.yaml"
    raw = base_config_dict(tmp_path / "runs", corpus)
    raw["tokenizer"] = {"kind": "bpe", "vocab_size": 300}
    config.write_text(json.dumps(raw), encoding="utf-8")
    command = [sys.executable, "-m", "lmzoo", "prepare", str(config), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    states = sorted(out.split(":")[0] for out in outputs)
    assert states == ["prepared", "up to date"], outputs
    directories = {out.split(": ", 1)[1].split()[0] for out in outputs}
    assert len(directories) == 1  # one directory, prepared once


def test_the_cli_prepares_reports_and_refuses_example_data(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    config = tmp_path / "cfg.yaml"
    config.write_text(json.dumps(base_config_dict(tmp_path / "runs", path)), encoding="utf-8")
    runner = CliRunner()
    first = runner.invoke(app, ["prepare", str(config)])
    assert first.exit_code == 0 and first.stdout.startswith("prepared: ")
    assert "train" in first.stdout and "uint16" in first.stdout
    again = runner.invoke(app, ["prepare", str(config)])
    assert (
        again.stdout.startswith("up to date: ")
        and again.stdout.split("\n", 1)[1] == first.stdout.split("\n", 1)[1]
    )
    assert runner.invoke(app, ["prepare", str(config), "--force"]).stdout.startswith("prepared: ")
    refused = runner.invoke(app, ["prepare", str(config), "data.format=instruct"])
    assert (
        refused.exit_code == 2 and refused.stderr.count("\n") == 1 and "nothing to prepare" in refused.stderr
    )


def test_eval_and_score_read_a_file_from_its_prepared_tokens(trained_run, tmp_path):
    path = tmp_path / "held_out.txt"
    path.write_text(TEXT[:300], encoding="utf-8")
    runner = CliRunner()
    evaluated = runner.invoke(app, ["eval", "--run", str(trained_run), "--data", str(path)])
    scored = runner.invoke(app, ["score", "--run", str(trained_run), "--file", str(path), "--json"])
    as_text = runner.invoke(app, ["score", "--run", str(trained_run), "--text", TEXT[:300], "--json"])
    summary = json.loads(scored.stdout.splitlines()[-1])["summary"]
    assert summary == json.loads(as_text.stdout.splitlines()[-1])["summary"]
    assert f"loss {summary['loss']:.4f}" in evaluated.stdout
    manifests = list(Path(os.environ["LMZOO_CACHE_DIR"]).glob("*/tok-*/manifest.json"))
    assert any(json.loads(m.read_text())["corpus"]["train"] == [str(path)] for m in manifests)


# ---- bad input: one line each, nothing lost ------------------------------------------------------------


def test_a_bad_byte_deep_inside_a_large_file_names_the_file_line_and_byte(tmp_path):
    path = tmp_path / "large.txt"
    line = b"a line of plain text, long enough to fill the file quickly\n"
    body = line * 200_000  # ~12 MB: several read chunks
    path.write_bytes(body + b"caf\xe9 au lait\n" + line)
    message = one_line_error(lambda: prepared(DataConfig(train=str(path))))
    offset = len(body) + 3
    assert message == f"{path}: not UTF-8 text (byte {offset}, line 200001: invalid continuation byte)"


def test_a_folder_without_text_files_and_bad_jsonl_lines_are_one_line_each(tmp_path):
    empty = tmp_path / "pictures"
    empty.mkdir()
    (empty / "cat.png").write_bytes(b"\x89PNG")
    assert "no text files in this folder" in one_line_error(lambda: prepared(DataConfig(train=str(empty))))
    only_empty = tmp_path / "blank"
    only_empty.mkdir()
    (only_empty / "a.txt").write_text("", encoding="utf-8")
    assert "every file is empty (1 skipped)" in one_line_error(
        lambda: prepared(DataConfig(train=str(only_empty)))
    )
    for text, words in [
        ('{"text": "fine"}\n{"body": "no text"}\n', "line 2: no 'text' field"),
        ('{"text": "fine"}\n\n{"text": "x",\n', "line 3: not JSON"),
        ('{"text": 3}\n', "line 1: a non-string 'text' field"),
    ]:
        path = tmp_path / "bad.jsonl"
        path.write_text(text * 1, encoding="utf-8")
        message = one_line_error(lambda p=path: prepared(DataConfig(train=str(p), split_by="tokens")))
        assert message.startswith(f"{path} {words}"), message


def test_training_on_a_folder_skips_its_empty_files_and_counts_them(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for index in range(20):
        (folder / f"{index:02}.txt").write_text(TEXT if index % 5 else "", encoding="utf-8")
    runner = CliRunner()
    config = tmp_path / "cfg.yaml"
    config.write_text(json.dumps(base_config_dict(tmp_path / "runs", folder)), encoding="utf-8")
    result = runner.invoke(app, ["prepare", str(config)])
    assert result.exit_code == 0 and "skipped 4 empty file(s)" in result.stdout
    trained = runner.invoke(app, ["train", str(config), "train.max_steps=2", "--no-progress"])
    assert trained.exit_code == 0, trained.output


# ---- examples stored compactly ------------------------------------------------------------------------


def test_packed_examples_read_back_as_the_lists_at_a_few_bytes_per_token():
    examples = [([3, 4, 5], [6]), ([], [7, 8]), ([9] * 50, [10] * 20)]
    packed = PackedExamples.of(examples, 2, dtype=np.uint16)
    assert list(packed) == [tuple(e) for e in examples] and len(packed) == 3
    assert packed.lengths(0).tolist() == [3, 0, 50] and packed.tokens() == 76
    nested = PackedExamples.of(
        [(([1], [2, 3]), [4]), (([5], []), [6, 7])],
        3,
        shape=lambda f: ((f[0], f[1]), f[2]),
        flat=lambda e: (*e[0], e[1]),
    )
    assert nested[0] == (([1], [2, 3]), [4]) and nested[1] == (([5], []), [6, 7])


def test_split_text_reads_a_split_as_prepare_routes_it(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    data = DataConfig(train=str(path), split=(0.8, 0.1, 0.1))
    lines = TEXT.splitlines(keepends=True)
    assert split_text(data, "val", 1 << 20) == "".join(lines[40:45])
    assert split_text(data, "train", 12) == lines[0][:12]


@pytest.mark.parametrize("max_tokens", [None, 80])
def test_sentence_pairs_train_from_compact_tables_with_the_batches_of_lists(tmp_path, max_tokens):
    from conftest import tiny_model_section

    from lmzoo.data.examples import encode_pairs, pair_batches
    from lmzoo.data.token_batches import TokenBatches
    from lmzoo.training.setup import setup_training

    pairs = tmp_path / "pairs.tsv"
    lines = TEXT.splitlines()
    pairs.write_text("".join(f"{s}\t{s[::-1]}\n" for s in lines), encoding="utf-8")
    raw = base_config_dict(tmp_path / "runs", pairs)
    raw["data"] = {
        "format": "tsv",
        "train": str(pairs),
        "batch_size": 4,
        "max_len": 32,
        "max_tokens": max_tokens,
    }
    raw["model"] = tiny_model_section("seq2seq")
    task = setup_training(config_from_dict(raw)).task
    examples = task.batches.examples if max_tokens is None else None
    tok, train = task.tokenizer, [(s, s[::-1]) for s in lines[: round(len(lines) * 0.9)]]
    listed = encode_pairs(train, tok, tok, max_len=32)
    ids = {"bos_id": tok.bos_id, "eos_id": tok.eos_id}
    if max_tokens is None:
        assert isinstance(examples, PackedExamples) and examples.tables[0].ids.dtype == np.uint16
        assert list(examples) == listed
        reference = pair_batches(listed, 4, seed=1234, **ids)
    else:
        reference = TokenBatches(listed, max_tokens, seed=1234, **ids)
    for _ in range(2 * len(reference) + 1):
        a, b = task.batches.next(), reference.next()
        assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3], strict=True))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab \n\x00é’\uffff\u00ff😀\U0010ffffz")), max_size=80))
def test_the_char_encoder_and_vocabulary_pass_match_the_tokenizer(text):
    """ASCII, Basic Multilingual Plane and astral text, with characters outside the vocabulary (z)."""
    tokenizer = fit_tokenizer(CharTokenizerConfig(), "ab \né’\uffff😀\x00")
    for dtype in (np.uint16, np.uint32):
        [fast] = encoder_for(tokenizer, dtype)([text])
        assert fast.dtype == dtype and fast.tolist() == tokenizer.encode(text)
    for workers in (1, 2):  # in this thread, and in threads of their own
        assert _characters(iter([Piece(text, True), Piece(text[::-1], False)]), workers) == set(text)


CHAR_CORPORA = {
    # two files carved by lines: the split falls in the second; "Ω" and "ß" only in validation text
    "lines": ({"a.txt": "ab é’\nx😀y\n", "b.txt": "cd\nΩ and ß\nlast"}, {"split": (0.6, 0.4, 0.0)}, "train"),
    "line ends in one block": ({"a.txt": "é\n\n\n\nΩ\n"}, {"split": (0.5, 0.5, 0.0)}, "train"),
    "all splits": ({"a.txt": "ab é\nΩ\n"}, {"val": "v.txt", "split": (0.9, 0.0, 0.1)}, "all"),
    "documents": (
        {"d/1.txt": "é’ a\n", "d/2.txt": "😀 b", "d/3.txt": "Ω c\n"},
        {"split": (0.6, 0.4, 0.0)},
        "train",
    ),
    "token tail": ({"a.txt": "ab é\nΩ\n"}, {"split_by": "tokens", "split": (0.5, 0.5, 0.0)}, "train"),
}


@pytest.mark.parametrize("case", CHAR_CORPORA, ids=str)
def test_the_char_vocabulary_read_from_bytes_is_the_one_read_from_text(tmp_path, case):
    """Plain text files give their characters from their bytes, without decoding the ASCII ones; the
    characters are those of the fitted splits' text, in blocks that cut multi-byte characters."""
    files, options, fit_on = CHAR_CORPORA[case]
    for name, text in {**files, "v.txt": "vΣ\n"}.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    train = str(tmp_path / "d") if case == "documents" else [str(tmp_path / n) for n in files]
    val = str(tmp_path / options.pop("val")) if "val" in options else None
    data = DataConfig(train=train, val=val, cache_dir=str(tmp_path / "cache"), **options)
    corpus = scanned(plan_corpus(data), verify=False, progress=False, say=quiet)
    config = CharTokenizerConfig(fit_on=fit_on)
    exact = _characters(piece for _, piece in _fitted_pieces(corpus, config))
    plain = _plain_text(corpus, config)
    assert plain is not None
    for size in (1, 2, 3, 5, 1 << 16):
        assert _raw_characters(*plain, size=size) == exact
    assert ("Ω" in exact) == (fit_on == "all" or case == "token tail")


def test_the_char_vocabulary_is_read_from_text_where_bytes_are_not_the_text(tmp_path):
    crlf, jsonl = tmp_path / "crlf.txt", tmp_path / "c.jsonl"
    crlf.write_bytes("ab\r\né\r\n".encode())
    jsonl.write_text('{"text": "caf\\u00e9"}\n{"text": "x"}\n', encoding="utf-8")
    for path, unit, expected in ((crlf, "lines", "ab\n"), (jsonl, "documents", "café")):
        data = DataConfig(
            train=str(path), split=(0.5, 0.5, 0.0), split_by=unit, cache_dir=str(tmp_path / "c")
        )
        corpus = scanned(plan_corpus(data), verify=False, progress=False, say=quiet)
        plain = _plain_text(corpus, CharTokenizerConfig())
        assert plain is None or _raw_characters(*plain) is None
        assert set(prepared(data).tokenizer.stoi) - {"<unk>", "<eos>", "<pad>", "<bos>"} == set(expected)


SEPARATORS = [chr(c) for c in range(0x3001) if chr(c).isspace()]  # every character str.split splits at


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(["ab", "Σ", "ΟΔΟΣ", "Éa", "<eos>", "!", ".", "\x00", "’", "é", *SEPARATORS]),
        max_size=30,
    ),
    st.sampled_from([{}, {"lowercase": False, "filters": ""}, {"filters": "é!"}, {"newline_token": False}]),
)
def test_the_word_tokenizers_one_pass_encoding_and_counting_find_the_words_of_words(pieces, options):
    """Encoding and counting split the whole text at once (line ends marked); they find the words that
    `words()` finds line by line, at every separator str.split knows."""
    text = "".join(pieces)
    config = WordTokenizerConfig(**options)
    tokenizer = fit_tokenizer(config, "ab σ οδος éa ! ’\nab")
    words = tokenizer.words(text)
    assert tokenizer.encode(text) == [tokenizer.stoi.get(w, tokenizer.unk_id) for w in words]
    expected = Counter(words)
    expected.pop("<eos>", None)
    assert tokenizer.count_words(text) == expected


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(
            st.sampled_from(["ab", " ", "\n", "\x00", " \x00 ", "<eos>", "The", "é!", "\t"]), max_size=12
        ).map("".join),
        min_size=1,
        max_size=4,
    ),
    st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_words_numbered_in_one_pass_are_the_words_encoding_looks_up_and_fitting_counts(texts, counted):
    """A line end is 0 (MARK, or <eos> in a text that holds MARK, where MARK is a word like any other).
    A counted text is cut after its first line end (as blocks of the fit sample), and only its first part
    counted."""
    config = WordTokenizerConfig()
    tokenizer = fit_tokenizer(config, "ab the \x00 é\nab")
    parts, counted_text = [], []
    for text, count in zip(texts, counted, strict=False):
        cut = text.find("\n") + 1
        if count and 0 < cut < len(text):
            parts.append([(0, cut, True), (cut, len(text), False)])
            counted_text.append(text[:cut])
        else:
            parts.append([(0, len(text), count)])
            counted_text.append(text if count else "")
    distinct, arrays, counts = word_pass.number_words(WordTokenizer.splitter(config), texts, parts)
    for text, ids in zip(texts, arrays, strict=True):
        looked_up = [
            tokenizer.eos_id if n == 0 else tokenizer.stoi.get(distinct[n - 1], tokenizer.unk_id) for n in ids
        ]
        assert looked_up == tokenizer.encode(text)
    expected = sum((tokenizer.count_words(t) for t in counted_text), Counter())
    assert {distinct[i - 1]: int(c) for i, c in enumerate(counts) if c} == dict(expected)
