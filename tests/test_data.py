"""Corpus reading, splits and the two batch layouts (prepared corpora: tests/test_prepare.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import TINY_TEXT

from lmzoo.config import DataConfig
from lmzoo.data.corpus import read_text_file
from lmzoo.data.prepare import prepare_corpus, split_text
from lmzoo.data.sources import find_sources, text_chunks
from lmzoo.data.streams import RandomWindows, SequentialBatches, make_batches
from lmzoo.data.tokenizer import CharTokenizerConfig
from lmzoo.errors import DataError

# ---- reading files -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "the file is empty"),
        (b"   \n\t\n  ", "the file is only whitespace"),
        (b"good line\nbad \xff\xfe byte\n", "not UTF-8 text"),
    ],
    ids=["empty", "whitespace", "not-utf8"],
)
def test_unusable_corpus_files_raise_data_error(tmp_path, content, problem):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_text_file(path)
    message = str(info.value)
    assert problem in message and str(path) in message and "\n" not in message


def test_non_utf8_error_points_at_the_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("first\nsecond\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"byte 16, line 3"):
        read_text_file(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_text_file(tmp_path / "absent.txt")
    with pytest.raises(DataError, match="directory"):
        read_text_file(tmp_path)


def read_splits(data: DataConfig) -> dict[str, str]:
    """The text of each split, as prepare routes it."""
    return {name: split_text(data, name, 1 << 30) for name in ("train", "val", "test")}


def test_empty_training_file_fails_when_prepared(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="only whitespace"):
        prepare_corpus(DataConfig(train=str(path)), CharTokenizerConfig())


def test_crlf_is_normalised(tmp_path):
    path = tmp_path / "dos.txt"
    path.write_bytes(b"one\r\ntwo\r\n")
    assert read_text_file(path) == "one\ntwo\n"


def test_bundled_corpus_reads():
    text = read_text_file("lmzoo:tinyshakespeare.txt")
    assert text.startswith("First Citizen")


# ---- splits -------------------------------------------------------------------------------------


def test_splits_are_by_lines_and_cover_the_text(corpus_file):
    splits = read_splits(DataConfig(train=str(corpus_file), split=(0.8, 0.1, 0.1)))
    lines = TINY_TEXT.splitlines(keepends=True)
    assert splits["train"] == "".join(lines[:36])  # round(45 * 0.8)
    assert splits["val"] == "".join(lines[36:40])  # round(4.5) == 4
    assert splits["test"] == "".join(lines[40:])
    assert splits["train"] + splits["val"] + splits["test"] == TINY_TEXT


def test_separate_val_and_test_files(tmp_path, corpus_file):
    val, test = tmp_path / "val.txt", tmp_path / "test.txt"
    val.write_text("validation text\n", encoding="utf-8")
    test.write_text("test text\n", encoding="utf-8")
    splits = read_splits(DataConfig(train=str(corpus_file), val=str(val), test=str(test)))
    assert splits == {"train": TINY_TEXT, "val": "validation text\n", "test": "test text\n"}


def test_several_training_files_are_documents_separated_by_eos(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("no newline at end", encoding="utf-8")
    b.write_text("second\n" * 30, encoding="utf-8")
    data = DataConfig(train=[str(a), str(b)], split=(0.9, 0.1, 0.0))
    splits = read_splits(data)
    assert (splits["train"] + splits["val"]).startswith("no newline at endsecond\n")
    corpus = prepare_corpus(data, CharTokenizerConfig())
    decoded = [corpus.tokenizer.itos[i] for i in corpus.tokens("train")[:25]]
    assert "".join(decoded).startswith("no newline at end<eos>second\n")  # the documents, marked apart


def test_too_few_lines_for_validation(tmp_path):
    path = tmp_path / "one_line.txt"
    path.write_text("only one line of text\n", encoding="utf-8")
    with pytest.raises(DataError, match="validation split is empty"):
        prepare_corpus(DataConfig(train=str(path)), CharTokenizerConfig())


# ---- SequentialBatches --------------------------------------------------------------------------


def test_sequential_batches_are_contiguous_columns():
    stream = torch.arange(1000)
    batch, seq = 4, 10
    batches = SequentialBatches(stream, batch, seq)
    columns = 1000 // batch  # 250 tokens per column
    assert len(batches) == (columns - 1) // seq == 24
    previous = None
    for k in range(len(batches)):
        x, y, starts_epoch = batches.next()
        assert x.shape == y.shape == (batch, seq)
        assert starts_epoch == (k == 0)
        # Row b reads column b of the stream, window k.
        expected = torch.arange(batch)[:, None] * columns + k * seq + torch.arange(seq)
        assert torch.equal(x, expected)
        assert torch.equal(y, x + 1)  # targets are the inputs shifted by one
        if previous is not None:
            px, py = previous
            assert torch.equal(x[:, 0], px[:, -1] + 1)  # batch k+1 continues batch k
            assert torch.equal(x[:, 0], py[:, -1])
        previous = (x, y)


def test_sequential_batches_start_a_new_epoch():
    batches = SequentialBatches(torch.arange(100), 2, 6)
    first, _, _ = batches.next()
    for _ in range(len(batches) - 1):
        batches.next()
    assert batches.epoch == 0
    x, _, starts_epoch = batches.next()
    assert starts_epoch and batches.epoch == 1 and torch.equal(x, first)


def test_sequential_batches_resume_from_state_dict():
    stream = torch.randint(0, 50, (500,))
    a = SequentialBatches(stream, 3, 7)
    for _ in range(30):  # past an epoch boundary (23 batches per epoch)
        a.next()
    state = a.state_dict()
    b = SequentialBatches(stream, 3, 7)
    b.load_state_dict(state)
    for _ in range(10):
        xa, ya, sa = a.next()
        xb, yb, sb = b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and sa == sb


def test_corpus_shorter_than_one_batch_is_a_data_error():
    with pytest.raises(DataError) as info:
        SequentialBatches(torch.arange(40), 4, 10)  # needs 4 * 11 = 44 tokens
    message = str(info.value)
    assert "40 tokens" in message and "44" in message and "data.batch_size" in message
    SequentialBatches(torch.arange(44), 4, 10)  # exactly one batch is enough


def test_make_batches_picks_the_layout():
    stream = torch.arange(200)
    assert isinstance(make_batches(stream, 2, 8, sequential=True, seed=0), SequentialBatches)
    assert isinstance(make_batches(stream, 2, 8, sequential=False, seed=0), RandomWindows)


# ---- RandomWindows --------------------------------------------------------------------------------


def test_random_windows_are_slices_of_the_stream():
    stream = torch.arange(300) * 7  # values encode positions
    windows = RandomWindows(stream, 5, 12, seed=3)
    for _ in range(5):
        x, y, starts_epoch = windows.next()
        assert x.shape == y.shape == (5, 12) and starts_epoch
        starts = x[:, 0] // 7
        assert torch.equal(x, stream[starts[:, None] + torch.arange(12)])
        assert torch.equal(y, stream[starts[:, None] + 1 + torch.arange(12)])


def test_random_windows_are_reproducible_from_state_dict():
    stream = torch.randint(0, 100, (400,))
    a = RandomWindows(stream, 4, 9, seed=11)
    for _ in range(7):
        a.next()
    state = a.state_dict()
    # The state goes through a checkpoint: torch.save, then a weights_only load.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=True)
    expected = [a.next() for _ in range(5)]
    b = RandomWindows(stream, 4, 9, seed=999)  # a different seed: the state must win
    b.load_state_dict(restored)
    assert b.drawn == 7
    for xe, ye, _ in expected:
        x, y, _ = b.next()
        assert torch.equal(x, xe) and torch.equal(y, ye)
    # Same seed from scratch gives the same sequence too, a different one does not.
    c, d = RandomWindows(stream, 4, 9, seed=11), RandomWindows(stream, 4, 9, seed=12)
    assert torch.equal(c.next()[0], RandomWindows(stream, 4, 9, seed=11).next()[0])
    assert not torch.equal(RandomWindows(stream, 4, 9, seed=11).next()[0], d.next()[0])


def test_random_windows_need_one_window():
    with pytest.raises(DataError, match="fewer than one window"):
        RandomWindows(torch.arange(8), 2, 8, seed=0)


def test_batches_of_a_memory_mapped_split_are_read_from_its_file(tmp_path):
    """A memory-mapped split is read with positioned reads: the same batches as the array in memory."""
    values = np.random.default_rng(0).integers(0, 60000, 5000).astype(np.uint16)
    path = tmp_path / "train.bin"
    values.tofile(path)
    mapped = np.memmap(path, dtype=np.uint16, mode="c", shape=(len(values),))
    assert RandomWindows(mapped, 4, 9, seed=0).rows.file is not None
    for make in (lambda s: RandomWindows(s, 4, 9, seed=5), lambda s: SequentialBatches(s, 3, 11)):
        from_file, in_memory = make(mapped), make(torch.from_numpy(values.astype(np.int64)))
        for _ in range(50):
            a, b = from_file.next(), in_memory.next()
            assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
            assert a.starts_epoch == b.starts_epoch


@pytest.mark.parametrize("size", range(1, 12))
def test_windows_line_ends_become_newlines_at_any_chunk_boundary(tmp_path, size):
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"ab\r\ncd\r\n" * 10 + b"x\xc3\xa9\r\n")
    source = find_sources(str(path)).sources[0]
    assert "".join(text_chunks(source, size)) == "ab\ncd\n" * 10 + "x\u00e9\n"
