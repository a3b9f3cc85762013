"""Examples that are not one stream of text: sentence pairs (seq2seq), instruction records (SFT) and
preference pairs (DPO), and `ShuffledBatches`, the one batch source for all of them.

A resumed run redraws exactly the order it was in: each epoch's order comes from (seed, epoch) alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lmzoo.config.schema import DataConfig
from lmzoo.data.batch import LMBatch, PairBatch, PreferenceBatch, RewardPairBatch
from lmzoo.data.corpus import carve_splits, read_text_file
from lmzoo.errors import DataError

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
    parts = carve_splits(pairs, config.split, given)
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


def read_records(
    path: str, fields: tuple[str, ...], optional: tuple[str, ...] = (), *, nonempty: tuple[str, ...] = ()
) -> list[dict[str, str]]:
    """JSON array or JSONL records holding string `fields` (and, if present, string `optional` fields,
    "" when absent; `nonempty` ones must hold more than whitespace); a bad line or record is named by
    its number."""
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
        for field in fields + optional:
            value = record.get(field, "" if field == "input" or field in optional else None)
            if not isinstance(value, str):
                raise DataError(f"{path} {where} {number}: field {field!r} is missing or not a string")
        for field in nonempty:
            if not record[field].strip():
                raise DataError(f"{path} {where} {number}: field {field!r} is empty")
        checked.append({field: record.get(field, "") for field in fields + optional})
    if not checked:
        raise DataError(f"{path}: no records")
    return checked


def read_record_splits(
    config: DataConfig,
    fields: tuple[str, ...],
    optional: tuple[str, ...] = (),
    *,
    nonempty: tuple[str, ...] = (),
) -> dict[str, list[dict[str, str]]]:
    """Records of the train file; the validation records come from data.val or are split off train."""
    if config.tasks is not None and "task" not in fields + optional:
        optional = optional + ("task",)

    def read(path: str) -> list[dict[str, str]]:
        records = read_records(path, fields, optional, nonempty=nonempty)
        if config.tasks is None:
            return records
        kept = [r for r in records if r["task"] in config.tasks]
        if not kept:
            raise DataError(f"{path}: no records of data.tasks {config.tasks}")
        return kept

    records = read(config.train_files[0])
    parts = carve_splits(records, config.split, {"val": bool(config.val), "test": bool(config.test)})
    if config.val:
        parts["val"] = read(config.val)
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


def scored_ids(tokenizer, prompt: str, response: str) -> list[int]:
    """prompt + response + <eos>: what a reward model reads (it scores the state at the <eos>)."""
    return (tokenizer.encode(prompt) or [tokenizer.bos_id]) + tokenizer.encode(response) + [tokenizer.eos_id]


def pad_rows(rows: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into (B, T) with their lengths (B,)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row)
    return ids, torch.tensor([len(row) for row in rows])


def reward_pair_batch(rows: list[tuple[list[int], list[int]]]) -> RewardPairBatch:
    """Chosen and rejected sequences padded to one width, so one forward pass scores both."""
    ids, lengths = pad_rows([chosen for chosen, _ in rows] + [rejected for _, rejected in rows])
    half = len(rows)
    return RewardPairBatch(ids[:half], lengths[:half], ids[half:], lengths[half:])
