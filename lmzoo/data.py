"""Corpora -> token streams -> batches.

Two ways to cut a language-model stream into batches:

* `SequentialBatches`: the classic truncated-BPTT layout. The stream is split into `batch_size`
  contiguous columns and read `seq_len` tokens at a time, so batch k+1 continues batch k and a
  recurrent model can carry its hidden state across batches.
* `RandomWindows`: independent windows at random offsets (what attention models train on).

Examples that are not one stream (sentence pairs, SFT records, preference pairs) come in
`ShuffledBatches`. Every source keeps its position in a small `state_dict`, so a resumed run reads
exactly the batches an uninterrupted run would have read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmzoo.config.schema import DataConfig, resolve_data_path
from lmzoo.errors import DataError
from lmzoo.objectives import LMBatch, PairBatch, PreferenceBatch


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


def _carve(items: list, fractions: tuple[float, float, float], given: dict[str, bool]) -> dict[str, list]:
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
    parts = {name: "".join(chunk) for name, chunk in _carve(lines, config.split, given).items()}
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


def encode_stream(tokenizer, text: str) -> torch.Tensor:
    """Encode text into one flat LongTensor of token ids."""
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


class SequentialBatches:
    """Contiguous truncated-BPTT batches: (x, y, starts_epoch) with x, y of shape (B, T).

    `starts_epoch` is True for the first batch of each pass, where a carried state must be reset.
    With `device`, the stream is moved there once and batches are views of it (no copy per step).
    """

    def __init__(
        self,
        stream: torch.Tensor,
        batch_size: int,
        seq_len: int,
        *,
        name: str = "train",
        device: torch.device | str | None = None,
    ) -> None:
        columns = len(stream) // batch_size
        if columns < seq_len + 1:
            need = batch_size * (seq_len + 1)
            raise DataError(
                f"the {name} split has {len(stream)} tokens, fewer than one batch needs "
                f"(batch_size {batch_size} x (seq_len {seq_len} + 1) = {need}); "
                "lower data.batch_size or data.seq_len, or add text"
            )
        self.data = stream[: columns * batch_size].view(batch_size, columns).to(device or stream.device)
        self.seq_len = seq_len
        self.batches_per_epoch = (columns - 1) // seq_len
        self.epoch, self.index = 0, 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def next(self) -> LMBatch:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        start = self.index * self.seq_len
        x = self.data[:, start : start + self.seq_len]
        y = self.data[:, start + 1 : start + 1 + self.seq_len]
        starts_epoch = self.index == 0
        self.index += 1
        return LMBatch(x, y, starts_epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class RandomWindows:
    """Batches of windows at random offsets, drawn from a generator whose state is checkpointed.

    With `device`, the stream lives there (moved once) and windows are gathered there: only the
    batch's start offsets, drawn on the CPU generator (so runs and resumes match across devices), travel.
    """

    def __init__(
        self,
        stream: torch.Tensor,
        batch_size: int,
        seq_len: int,
        *,
        seed: int,
        name: str = "train",
        device: torch.device | str | None = None,
    ) -> None:
        if len(stream) < seq_len + 1:
            raise DataError(
                f"the {name} split has {len(stream)} tokens, fewer than one window of "
                f"seq_len {seq_len} + 1; lower data.seq_len or add text"
            )
        self.stream = stream.to(device or stream.device)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self.offsets = torch.arange(seq_len + 1, device=self.stream.device)
        self.batches_per_epoch = max(1, len(stream) // (batch_size * seq_len))
        self.drawn = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.drawn // self.batches_per_epoch

    def next(self) -> LMBatch:
        high = len(self.stream) - self.seq_len
        starts = torch.randint(high, (self.batch_size,), generator=self.generator)
        if self.stream.is_cuda:  # from pinned memory: the copy does not wait for the GPU's queue
            starts = starts.pin_memory().to(self.stream.device, non_blocking=True)
        else:
            starts = starts.to(self.stream.device)
        window = self.stream[starts[:, None] + self.offsets]  # (B, T+1), gathered where the stream is
        self.drawn += 1
        return LMBatch(window[:, :-1], window[:, 1:], True)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.drawn = int(state["drawn"])


def eval_windows(stream: torch.Tensor, batch_size: int, seq_len: int, max_batches: int | None = None):
    """Yield (x, y) batches that cover a stream in order, for evaluation with a carried state.

    Short validation splits shrink the batch (and, if needed, the window) instead of failing.
    """
    if len(stream) < 2:
        raise DataError("the evaluation split has fewer than 2 tokens")
    seq_len = min(seq_len, len(stream) - 1)
    batch_size = max(1, min(batch_size, (len(stream) - 1) // seq_len))
    columns = len(stream) // batch_size
    data = stream[: columns * batch_size].view(batch_size, columns)
    count = 0
    for start in range(0, columns - 1, seq_len):
        if max_batches is not None and count >= max_batches:
            return
        end = min(start + seq_len, columns - 1)
        yield data[:, start:end], data[:, start + 1 : end + 1]
        count += 1


def make_batches(
    stream: torch.Tensor,
    batch_size: int,
    seq_len: int,
    *,
    sequential: bool,
    seed: int,
    device: torch.device | str | None = None,
):
    """The training batch source: contiguous truncated-BPTT batches, or random windows (kept on `device`)."""
    if sequential:
        return SequentialBatches(stream, batch_size, seq_len, device=device)
    return RandomWindows(stream, batch_size, seq_len, seed=seed, device=device)


# ---- sentence pairs (seq2seq) ------------------------------------------------------------------


Pair = tuple[str, str]


@dataclass
class PairSplits:
    """(source, target) sentence pairs of the train / validation / test splits."""

    train: list[Pair]
    val: list[Pair]
    test: list[Pair]


def _lines(text: str) -> list[str]:
    """The lines of a file, split at "\n" only: str.splitlines() also splits at characters that may
    occur inside a sentence (U+2028, U+0085, form feed...), which would misalign a parallel corpus."""
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def read_pair_file(config: DataConfig, path: str) -> list[Pair]:
    """Sentence pairs from a `<path>.<source>`/`<path>.<target>` file pair or a TSV file."""
    if config.format == "tsv":
        pairs = []
        for number, line in enumerate(_lines(read_text_file(path)), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
                raise DataError(f"{path} line {number}: expected 'source<TAB>target', got {line[:60]!r}")
            pairs.append((fields[0].strip(), fields[1].strip()))
        return pairs
    source_path, target_path = config.files_of(path)
    sources = _lines(read_text_file(source_path))
    targets = _lines(read_text_file(target_path))
    if len(sources) != len(targets):
        raise DataError(
            f"{source_path} has {len(sources)} lines but {target_path} has {len(targets)}: "
            "parallel files must be aligned line by line"
        )
    for number, (src, tgt) in enumerate(zip(sources, targets, strict=True), start=1):
        if not src.strip() or not tgt.strip():
            empty = source_path if not src.strip() else target_path
            raise DataError(
                f"{empty} line {number}: empty sentence (parallel files need one sentence per line)"
            )
    return [(src.strip(), tgt.strip()) for src, tgt in zip(sources, targets, strict=True)]


def read_pair_splits(config: DataConfig) -> PairSplits:
    """Read the training pairs; split off validation and test pairs unless they have their own files."""
    pairs = read_pair_file(config, config.train_files[0])
    given = {"val": bool(config.val), "test": bool(config.test)}
    parts = _carve(pairs, config.split, given)
    if config.val:
        parts["val"] = read_pair_file(config, config.val)
    if config.test:
        parts["test"] = read_pair_file(config, config.test)
    if not parts["train"]:
        raise DataError("the training split has no sentence pairs")
    if not parts.get("val"):
        raise DataError(
            "the validation split has no sentence pairs: give data.val or raise its fraction in data.split"
        )
    return PairSplits(train=parts["train"], val=parts["val"], test=parts.get("test", []))


def encode_pairs(
    pairs: list[Pair], source_tokenizer, target_tokenizer, *, max_len: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """Token ids of each pair (source + <eos>, target); pairs longer than max_len are skipped."""
    encoded = []
    for src, tgt in pairs:
        src_ids = source_tokenizer.encode(src) + [source_tokenizer.eos_id]
        tgt_ids = target_tokenizer.encode(tgt)
        if max_len is not None and (len(src_ids) > max_len or len(tgt_ids) + 1 > max_len):
            continue
        encoded.append((src_ids, tgt_ids))
    return encoded


def collate_pairs(
    items: list[tuple[list[int], list[int]]], *, bos_id: int, eos_id: int, pad_id: int = 0
) -> PairBatch:
    """Pad a list of (source ids, target ids) into a PairBatch; targets get <bos> in and <eos> out."""
    src_len = max(len(s) for s, _ in items)
    tgt_len = max(len(t) for _, t in items) + 1
    source = torch.full((len(items), src_len), pad_id, dtype=torch.long)
    target_in = torch.full((len(items), tgt_len), pad_id, dtype=torch.long)
    target_out = torch.full((len(items), tgt_len), pad_id, dtype=torch.long)
    for row, (src, tgt) in enumerate(items):
        source[row, : len(src)] = torch.tensor(src)
        target_in[row, : len(tgt) + 1] = torch.tensor([bos_id] + tgt)
        target_out[row, : len(tgt) + 1] = torch.tensor(tgt + [eos_id])
    return PairBatch(source, target_in, target_out)


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """The visiting order of n items in one epoch: a permutation drawn from (seed, epoch) alone,
    so a resumed run redraws exactly the order it was in."""
    if not shuffle:
        return list(range(n))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def pair_batches(
    pairs: list[tuple[list[int], list[int]]],
    batch_size: int,
    *,
    seed: int,
    bos_id: int,
    eos_id: int,
    shuffle: bool = True,
    name: str = "train",
) -> ShuffledBatches:
    """Length-bucketed batches of sentence pairs (similar lengths together, little padding)."""
    return ShuffledBatches(
        pairs,
        batch_size,
        seed=seed,
        shuffle=shuffle,
        buckets=True,
        collate=functools.partial(collate_pairs, bos_id=bos_id, eos_id=eos_id),
        empty=f"the {name} split has no sentence pairs within data.max_len",
    )


# ---- records: instruction tuning (SFT) and preference pairs (DPO) ---------------------------------


def read_records(path: str, fields: tuple[str, ...]) -> list[dict[str, str]]:
    """JSON array or JSONL records holding string `fields`; a bad line or record is named by its number."""
    import json

    text = read_text_file(path)
    records: list = []
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {err.lineno}: invalid JSON ({err.msg})") from None
        where = "record"
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {number}: invalid JSON ({err.msg})") from None
        where = "line"
    checked = []
    for index, item in enumerate(records, start=1):
        number, record = item if where == "line" else (index, item)
        if not isinstance(record, dict):
            raise DataError(f"{path} {where} {number}: expected an object with {', '.join(fields)}")
        for field in fields:
            value = record.get(field, "" if field == "input" else None)
            if not isinstance(value, str):
                raise DataError(f"{path} {where} {number}: field {field!r} is missing or not a string")
        checked.append({field: record.get(field, "") for field in fields})
    if not checked:
        raise DataError(f"{path}: no records")
    return checked


def read_record_splits(config: DataConfig, fields: tuple[str, ...]) -> dict[str, list[dict[str, str]]]:
    """Records of the train file; the validation records come from data.val or are split off train."""
    records = read_records(config.train_files[0], fields)
    parts = _carve(records, config.split, {"val": bool(config.val), "test": bool(config.test)})
    if config.val:
        parts["val"] = read_records(config.val, fields)
    if not parts.get("val"):
        raise DataError("no validation records: give data.val or raise the validation fraction in data.split")
    return parts


def prompt_response_ids(
    tokenizer, prompt: str, response: str, context: int | None
) -> tuple[list[int], list[int]]:
    """(input ids, target ids) of prompt + response + <eos>; targets are PAD except on the response.

    A sequence longer than the context keeps the response and the end of the prompt.
    """
    from lmzoo.models.base import PAD_ID

    prompt_ids = tokenizer.encode(prompt) or [tokenizer.bos_id]
    response_ids = tokenizer.encode(response) + [tokenizer.eos_id]
    if context is not None and len(prompt_ids) + len(response_ids) > context + 1:
        response_ids = response_ids[:context]
        prompt_ids = prompt_ids[-(context + 1 - len(response_ids)) :]
    ids = prompt_ids + response_ids
    targets = [PAD_ID] * (len(prompt_ids) - 1) + response_ids
    return ids[:-1], targets


def collate_sequences(
    rows: list[tuple[list[int], list[int]]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (inputs, targets) rows into two (B, T) tensors."""
    width = max(len(inputs) for inputs, _ in rows)
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for row, (ids, tgt) in enumerate(rows):
        inputs[row, : len(ids)] = torch.tensor(ids)
        targets[row, : len(tgt)] = torch.tensor(tgt)
    return inputs, targets


class ShuffledBatches:
    """The batch source of examples (sentence pairs, SFT records, preference pairs), in a seeded order
    that changes every epoch and that a resumed run redraws exactly from (seed, epoch, index).

    With `buckets`, examples are sorted by length once (ties broken by a seeded shuffle) and cut
    into fixed batches of similar length; each epoch visits those batches in a new order. Without,
    each epoch shuffles the examples and cuts them into batches (the incomplete last one dropped).
    `collate` turns a list of examples into a batch; iterating gives one ordered pass (evaluation).
    """

    def __init__(
        self,
        examples: list,
        batch_size: int,
        *,
        seed: int,
        collate: Callable[[list], Any],
        shuffle: bool = True,
        buckets: bool = False,
        empty: str = "no training examples",
    ) -> None:
        if not examples:
            raise DataError(empty)
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.collate, self.shuffle = collate, shuffle
        self.buckets: list[list[int]] | None = None
        if buckets:
            tie = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
            order = sorted(
                range(len(examples)), key=lambda i: (len(examples[i][0]), len(examples[i][1]), tie[i])
            )
            self.buckets = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
            self.batches_per_epoch = len(self.buckets)
        elif shuffle:
            self.batches_per_epoch = max(1, len(examples) // batch_size)
        else:
            self.batches_per_epoch = -(-len(examples) // batch_size)
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        count = len(self.buckets) if self.buckets is not None else len(self.examples)
        return epoch_order(count, self.shuffle, self.seed, self.epoch)

    def _indices(self, position: int, order: list[int]) -> list[int]:
        if self.buckets is not None:
            return self.buckets[order[position]]
        return order[position * self.batch_size : (position + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[Any]:
        """One pass in a fixed order (length order for buckets), for evaluation."""
        size, count = self.batch_size, len(self.examples)
        groups = self.buckets or [
            list(range(start, min(start + size, count))) for start in range(0, count, size)
        ]
        for indices in groups:
            yield self.collate([self.examples[i] for i in indices])

    def next(self) -> Any:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_order()
        indices = self._indices(self.index, self._order)
        self.index += 1
        return self.collate([self.examples[i] for i in indices])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_order()


def sft_batch(rows: list[tuple[list[int], list[int]]]) -> LMBatch:
    inputs, targets = collate_sequences(rows)
    return LMBatch(inputs, targets, True)


def preference_batch(
    rows: list[tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]],
) -> PreferenceBatch:
    """Chosen and rejected sequences padded to one width, so one forward pass scores both."""
    inputs, targets = collate_sequences([chosen for chosen, _ in rows] + [rejected for _, rejected in rows])
    half = len(rows)
    return PreferenceBatch(inputs[:half], targets[:half], inputs[half:], targets[half:])
