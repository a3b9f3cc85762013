"""Sentence-pair batches by token count (`data.max_tokens`), as fairseq and OpenNMT build them.

The pairs are sorted by length once (ties broken by a seeded shuffle) and cut, in that order, into
batches whose padded size, rows x (longest source + longest target + 1), stays within `max_tokens`:
short sentences make batches of many rows and long ones of few, so every batch costs about the same
and carries little padding. Every batch is collated once, at construction, and moved to the device,
so a training step only picks a prepared batch: no per-step host work, no per-step token count.

Each epoch visits all batches (so every pair once) in a new order drawn from (seed, epoch). Under data
parallelism every process builds the same batches and, at each step, the N processes take the next
N batches of that shared order, rank r the r-th (`next_for_rank`): N processes compute exactly what
one process computes with `train.grad_accum` N, and `data.max_tokens` is a per-process budget.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from lmzoo.data.batch import PairBatch, to_device
from lmzoo.data.examples import collate_pairs, epoch_order
from lmzoo.data.packed import field_lengths
from lmzoo.errors import DataError

EncodedPair = tuple[list[int], list[int]]  # (source ids with <eos>, target ids)


def padded_tokens(pairs: list[EncodedPair]) -> int:
    """What a batch of these pairs costs once padded: rows x (longest source + longest target + 1)."""
    return len(pairs) * (max(len(s) for s, _ in pairs) + max(len(t) for _, t in pairs) + 1)


def token_groups(pairs: Sequence[EncodedPair], max_tokens: int, seed: int) -> list[list[int]]:
    """Indices of the pairs, sorted by (source, target) length, cut into groups of at most max_tokens
    padded tokens each."""
    tie = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    sources, targets = field_lengths(pairs, 0), field_lengths(pairs, 1)
    order = sorted(range(len(pairs)), key=lambda i: (sources[i], targets[i], tie[i]))
    groups: list[list[int]] = []
    current: list[int] = []
    source_width = target_width = 0
    for index in order:
        source, target = sources[index], targets[index] + 1
        if source + target > max_tokens:
            raise DataError(
                f"a sentence pair takes {source + target} tokens, more than data.max_tokens {max_tokens}"
            )
        wider_source, wider_target = max(source_width, source), max(target_width, target)
        if current and (len(current) + 1) * (wider_source + wider_target) > max_tokens:
            groups.append(current)
            current, wider_source, wider_target = [], source, target
        current.append(index)
        source_width, target_width = wider_source, wider_target
    groups.append(current)
    return groups


class TokenBatches:
    """Pre-collated, on-device sentence-pair batches of at most `max_tokens` padded tokens each.

    A batch source like lmzoo.data.ShuffledBatches: `next()`, `len()` (batches per epoch), a position
    to save and restore, and iteration in length order (evaluation).
    """

    def __init__(
        self,
        pairs: Sequence[EncodedPair],
        max_tokens: int,
        *,
        seed: int,
        bos_id: int,
        eos_id: int,
        device: torch.device | str | None = None,
        shuffle: bool = True,
        name: str = "train",
    ) -> None:
        if not pairs:
            raise DataError(f"the {name} split has no sentence pairs within data.max_len")
        self.groups = token_groups(pairs, max_tokens, seed)
        self.prepared = [
            _prepared([pairs[i] for i in group], bos_id, eos_id, device or "cpu") for group in self.groups
        ]
        self.seed, self.shuffle = seed, shuffle
        self.drawn = 0  # batches handed out so far, over all epochs and (under DDP) all ranks
        self._order_epoch, self._order = -1, list[int]()

    def __len__(self) -> int:
        return len(self.prepared)

    @property
    def epoch(self) -> int:
        return self.drawn // len(self.prepared)

    def _batch(self, position: int) -> PairBatch:
        """The batch at `position` of the endless sequence of epochs."""
        epoch, index = divmod(position, len(self.prepared))
        if epoch != self._order_epoch:
            self._order = epoch_order(len(self.prepared), self.shuffle, self.seed, epoch)
            self._order_epoch = epoch
        return self.prepared[self._order[index]]

    def next(self) -> PairBatch:
        batch = self._batch(self.drawn)
        self.drawn += 1
        return batch

    def next_for_rank(self, rank: int, world_size: int) -> PairBatch:
        """Rank `rank`'s batch of the next global step (the N processes take N consecutive batches)."""
        batch = self._batch(self.drawn + rank)
        self.drawn += world_size
        return batch

    def __iter__(self) -> Iterator[PairBatch]:
        """One pass in length order (evaluation)."""
        yield from self.prepared

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.drawn = int(state["drawn"])


def _prepared(pairs: list[EncodedPair], bos_id: int, eos_id: int, device: torch.device | str) -> PairBatch:
    batch = collate_pairs(pairs, bos_id=bos_id, eos_id=eos_id)
    tokens = sum(len(t) + 1 for _, t in pairs)  # target tokens (with <eos>): counted once, here
    return to_device(batch._replace(tokens=tokens), torch.device(device))
