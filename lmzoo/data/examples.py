"""Examples that are not one stream of text: sentence pairs (seq2seq), instruction records (SFT) and
preference pairs (DPO), encoded and collated, and `ShuffledBatches`, the one batch source for all of them.
Their files are read by lmzoo.data.example_files.

A resumed run redraws exactly the order it was in: each epoch's order comes from (seed, epoch) alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch

from lmzoo.data.batch import LMBatch, PairBatch, PreferenceBatch, RewardPairBatch
from lmzoo.data.example_files import Pair
from lmzoo.data.packed import field_lengths
from lmzoo.data.tokenizer import Tokenizer
from lmzoo.errors import DataError

# ---- sentence pairs (seq2seq) ------------------------------------------------------------------


def iter_encoded_pairs(
    pairs: Iterable[Pair],
    source_tokenizer: Tokenizer,
    target_tokenizer: Tokenizer,
    *,
    max_len: int | None = None,
) -> Iterator[tuple[list[int], list[int]]]:
    """Token ids of each pair (source + <eos>, target); pairs longer than max_len are skipped."""
    for src, tgt in pairs:
        src_ids = source_tokenizer.encode(src) + [source_tokenizer.eos_id]
        tgt_ids = target_tokenizer.encode(tgt)
        if max_len is not None and (len(src_ids) > max_len or len(tgt_ids) + 1 > max_len):
            continue
        yield src_ids, tgt_ids


def encode_pairs(
    pairs: Iterable[Pair],
    source_tokenizer: Tokenizer,
    target_tokenizer: Tokenizer,
    *,
    max_len: int | None = None,
) -> list[tuple[list[int], list[int]]]:
    """`iter_encoded_pairs` as a list (held-out pairs; training pairs go into PackedExamples)."""
    return list(iter_encoded_pairs(pairs, source_tokenizer, target_tokenizer, max_len=max_len))


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
    pairs: Sequence[tuple[list[int], list[int]]],
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


def prompt_response_ids(
    tokenizer: Tokenizer, prompt: str, response: str, context: int | None
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
        examples: Sequence[Any],
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
            first, second = field_lengths(examples, 0), field_lengths(examples, 1)
            order = sorted(range(len(examples)), key=lambda i: (first[i], second[i], tie[i]))
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


def pad_rows(rows: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into (B, T) with their lengths (B,)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row)
    return ids, torch.tensor([len(row) for row in rows])


class ScoredPair(NamedTuple):
    """A preference pair as a reward model reads it: prompt + response + <eos> for both responses."""

    prompt_length: int  # tokens of the shared prompt: where each response begins
    chosen: list[int]
    rejected: list[int]


def scored_pair(tokenizer: Tokenizer, prompt: str, chosen: str, rejected: str) -> ScoredPair:
    """prompt + response + <eos> for both responses (an empty prompt reads as <bos>)."""
    prompt_ids = tokenizer.encode(prompt) or [tokenizer.bos_id]
    ends = [tokenizer.encode(response) + [tokenizer.eos_id] for response in (chosen, rejected)]
    return ScoredPair(len(prompt_ids), prompt_ids + ends[0], prompt_ids + ends[1])


def reward_pair_batch(rows: list[ScoredPair]) -> RewardPairBatch:
    """Chosen and rejected sequences padded to one width, so one forward pass scores both."""
    ids, lengths = pad_rows([row.chosen for row in rows] + [row.rejected for row in rows])
    half = len(rows)
    starts = torch.tensor([row.prompt_length for row in rows])
    return RewardPairBatch(ids[:half], lengths[:half], ids[half:], lengths[half:], starts)
