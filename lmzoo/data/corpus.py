"""Corpus files -> text splits -> token streams.

A corpus is one or more UTF-8 text files; validation and test text is split off the training text
by lines unless they have files of their own. Problems with a file are one-line DataErrors that
name the file (and line and byte for undecodable text).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmzoo.config.schema import DataConfig, resolve_data_path
from lmzoo.data.tokenizer import Tokenizer
from lmzoo.errors import DataError


def read_text_file(path: str | Path) -> str:
    """Read a UTF-8 corpus file; missing, undecodable or blank files raise a one-line DataError."""
    resolved = resolve_data_path(str(path))
    try:
        raw = resolved.read_bytes()
    except FileNotFoundError:
        raise DataError(f"corpus file not found: {resolved}") from None
    except IsADirectoryError:
        raise DataError(f"corpus path is a directory, not a file: {resolved}") from None
    except OSError as err:
        raise DataError(f"cannot read corpus file {resolved}: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{resolved}: not UTF-8 text (byte {err.start}, line {line}: {err.reason})") from None
    if not text.strip():
        raise DataError(f"{resolved}: the file is {'empty' if not text else 'only whitespace'}")
    return text.replace("\r\n", "\n")


@dataclass
class TextSplits:
    """Raw text of the train / validation / test splits."""

    train: str
    val: str
    test: str


def carve_splits(
    items: list, fractions: tuple[float, float, float], given: dict[str, bool]
) -> dict[str, list]:
    """Split `items` in order into train/val/test by `fractions`, skipping the splits that are `given`.

    The fractions are shared among the carved splits, so with a separate validation file and
    split (0.9, 0.05, 0.05), training keeps 95% of the items. Rounding leftovers go to the last split.
    """
    carved = {n: f for n, f in zip(("train", "val", "test"), fractions, strict=True) if not given.get(n)}
    total = sum(carved.values())
    parts: dict[str, list] = {}
    start = 0
    for index, (name, frac) in enumerate(carved.items()):
        if index == len(carved) - 1:
            parts[name] = items[start:]
            break
        count = round(len(items) * frac / total)
        if name == "train":
            count = max(1, count)
        parts[name] = items[start : start + count]
        start += count
    return parts


def read_splits(config: DataConfig) -> TextSplits:
    """Read the training file(s); split off, by lines, each of val/test that has no file of its own."""
    text = "".join(_with_newline(read_text_file(p)) for p in config.train_files)
    lines = text.splitlines(keepends=True)
    given = {"val": bool(config.val), "test": bool(config.test)}
    parts = {name: "".join(chunk) for name, chunk in carve_splits(lines, config.split, given).items()}
    if config.val:
        parts["val"] = read_text_file(config.val)
    if config.test:
        parts["test"] = read_text_file(config.test)
    if not parts["train"].strip():
        raise DataError("the training split is empty: lower data.split's validation/test fractions")
    if not parts.get("val", "").strip():
        raise DataError(
            f"the validation split is empty ({len(lines)} lines in all): give data.val a file "
            "or raise the validation fraction in data.split"
        )
    return TextSplits(train=parts["train"], val=parts["val"], test=parts.get("test", ""))


def _with_newline(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def encode_stream(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """Encode text into one flat LongTensor of token ids."""
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)
