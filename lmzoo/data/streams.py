"""Language-model batch sources over a token stream.

Two ways to cut a language-model stream into batches:

* `SequentialBatches`: the classic truncated-BPTT layout. The stream is split into `batch_size`
  contiguous columns and read `seq_len` tokens at a time, so batch k+1 continues batch k and a
  recurrent model can carry its hidden state across batches.
* `RandomWindows`: independent windows at random offsets (what attention models train on).

A stream is a tensor or a numpy array, typically a prepared split memory-mapped from disk
(lmzoo.data.prepare): a batch reads only its own slices of it, so memory stays flat however large the
corpus is. The rows of a memory-mapped split are read from its file with positioned reads (`Rows`), not
through the mapping: Linux maps a whole large page-cache folio (up to 2 MB) on a fault, so windows read
through the mapping would grow the process's RSS with every batch. On CUDA a batch travels from pinned
memory without waiting (non-blocking).

Examples that are not one stream (sentence pairs, SFT records, preference pairs) come in
`lmzoo.data.examples.ShuffledBatches`. Every source keeps its position in a small `state_dict`, so
a resumed run reads exactly the batches an uninterrupted run would have read.
"""

from __future__ import annotations

import io
import mmap
import os

import numpy as np
import torch

from lmzoo.data.batch import LMBatch
from lmzoo.errors import DataError

Stream = torch.Tensor | np.ndarray


def as_array(stream: Stream) -> np.ndarray:
    """The stream as a numpy array without a copy (a CPU tensor shares its memory)."""
    return stream.cpu().numpy() if isinstance(stream, torch.Tensor) else stream


def to_batch_tensor(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Token ids read from the stream as a LongTensor on `device` (pinned and non-blocking on CUDA)."""
    tensor = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor if device.type == "cpu" else tensor.to(device)


class Rows:
    """Rows of `length` tokens at given offsets of a stream: read from the file of a memory-mapped
    array (a prepared split) with one positioned read each, else gathered from the array."""

    def __init__(self, stream: Stream) -> None:
        self.array = array = as_array(stream)
        self.file: io.FileIO | None = None
        self.offset = 0
        # the whole mapping (its base is the mmap), not a view of it: positions are the file's
        if isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and hasattr(os, "preadv"):
            self.file = open(array.filename, "rb", buffering=0)  # noqa: SIM115 (kept for the run)
            self.offset = array.offset

    def __len__(self) -> int:
        return len(self.array)

    def __call__(self, starts: np.ndarray, length: int) -> np.ndarray:
        if self.file is None:
            return self.array[starts[:, None] + np.arange(length)]
        rows = np.empty((len(starts), length), dtype=self.array.dtype)
        fd, itemsize = self.file.fileno(), self.array.itemsize
        for row, start in zip(rows, starts.tolist(), strict=True):
            if os.preadv(fd, [row], self.offset + start * itemsize) != row.nbytes:
                raise DataError(f"{self.file.name}: the token file is shorter than its manifest says")
        return rows

    def __del__(self) -> None:
        if self.file is not None:
            self.file.close()


class SequentialBatches:
    """Contiguous truncated-BPTT batches: (x, y, starts_epoch) with x, y of shape (B, T).

    `starts_epoch` is True for the first batch of each pass, where a carried state must be reset.
    """

    def __init__(
        self,
        stream: Stream,
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
        self.rows, self.starts = Rows(stream), np.arange(batch_size) * columns  # row b reads column b
        self.device = torch.device(device or "cpu")
        self.seq_len = seq_len
        self.batches_per_epoch = (columns - 1) // seq_len
        self.epoch, self.index = 0, 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def next(self) -> LMBatch:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        start = self.index * self.seq_len
        block = to_batch_tensor(self.rows(self.starts + start, self.seq_len + 1), self.device)  # (B, T+1)
        starts_epoch = self.index == 0
        self.index += 1
        return LMBatch(block[:, :-1], block[:, 1:], starts_epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class RandomWindows:
    """Batches of windows at random offsets, drawn from a generator whose state is checkpointed.

    The offsets are drawn on a CPU generator (so runs and resumes match across devices); the windows are
    read from the stream in one gather and sent to `device`.
    """

    def __init__(
        self,
        stream: Stream,
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
        self.rows = Rows(stream)
        self.device = torch.device(device or "cpu")
        self.batch_size, self.seq_len = batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_per_epoch = max(1, len(stream) // (batch_size * seq_len))
        self.drawn = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.drawn // self.batches_per_epoch

    def next(self) -> LMBatch:
        high = len(self.rows) - self.seq_len
        starts = torch.randint(high, (self.batch_size,), generator=self.generator).numpy()
        window = to_batch_tensor(self.rows(starts, self.seq_len + 1), self.device)  # (B, T+1)
        self.drawn += 1
        return LMBatch(window[:, :-1], window[:, 1:], True)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.drawn = int(state["drawn"])


def make_batches(
    stream: Stream,
    batch_size: int,
    seq_len: int,
    *,
    sequential: bool,
    seed: int,
    device: torch.device | str | None = None,
) -> SequentialBatches | RandomWindows:
    """The training batch source: contiguous truncated-BPTT batches, or random windows (sent to `device`)."""
    if sequential:
        return SequentialBatches(stream, batch_size, seq_len, device=device)
    return RandomWindows(stream, batch_size, seq_len, seed=seed, device=device)
