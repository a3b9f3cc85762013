"""Encoded examples stored compactly: every field's token sequences end to end in one numpy array.

A Python list of token ids costs about 36 bytes per token (a pointer and an int object); sentence pairs,
SFT records and preference pairs are kept here at 2 or 4 bytes per token plus 8 bytes per sequence,
so a corpus of examples takes less memory than its text. An example reads back as lists of ints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np


class TokenTable:
    """Token sequences end to end in one growing array, with where each ends."""

    def __init__(self, dtype: type[np.unsignedinteger] = np.uint32) -> None:
        self.ids = np.zeros(1 << 12, dtype=dtype)
        self.ends: list[int] = []
        self.size = 0

    def append(self, sequence: Sequence[int]) -> None:
        end = self.size + len(sequence)
        if end > len(self.ids):
            grown = np.zeros(max(end, 2 * len(self.ids)), dtype=self.ids.dtype)
            grown[: self.size] = self.ids[: self.size]
            self.ids = grown
        self.ids[self.size : end] = sequence
        self.size = end
        self.ends.append(end)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, index: int) -> list[int]:
        start = self.ends[index - 1] if index > 0 else 0
        return self.ids[start : self.ends[index]].tolist()

    def lengths(self) -> np.ndarray:
        ends = np.asarray(self.ends, dtype=np.int64)
        return np.diff(ends, prepend=0)


class PackedExamples(Sequence[Any]):
    """Examples of `fields` token sequences each (e.g. (source, target)), stored as TokenTables.

    `shape` rebuilds an example from its flat fields and `flat` takes it apart (preference pairs nest
    two (inputs, targets) pairs); by default an example is the tuple of its fields.
    """

    def __init__(
        self,
        fields: int,
        dtype: type[np.unsignedinteger] = np.uint32,
        *,
        shape: Callable[[tuple[list[int], ...]], Any] = tuple,
        flat: Callable[[Any], Sequence[Sequence[int]]] = tuple,
    ) -> None:
        self.tables = [TokenTable(dtype) for _ in range(fields)]
        self.shape, self.flat = shape, flat

    @classmethod
    def of(cls, examples: Iterable[Any], fields: int, **options: Any) -> PackedExamples:
        packed = cls(fields, **options)
        for example in examples:
            packed.append(example)
        return packed

    def append(self, example: Any) -> None:
        for table, sequence in zip(self.tables, self.flat(example), strict=True):
            table.append(sequence)

    def __len__(self) -> int:
        return len(self.tables[0])

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):  # a list of examples, as a list's slice would be
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.shape(tuple(table[index] for table in self.tables))

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))

    def lengths(self, field: int) -> np.ndarray:
        """The length of field `field` of every example (without reading the examples back)."""
        return self.tables[field].lengths()

    def tokens(self) -> int:
        return sum(table.size for table in self.tables)


def field_lengths(examples: Sequence[Any], field: int) -> Sequence[int]:
    """Lengths of one field of every example: from a PackedExamples' offsets, or by looking at each."""
    if isinstance(examples, PackedExamples):
        return examples.lengths(field).tolist()
    return [len(example[field]) for example in examples]
