"""Files of examples read as they stream: sentence pairs (parallel files or TSV) and records (JSONL or a
JSON array) for SFT and preference tuning.

No file is held whole (a JSON array aside: JSON has to be parsed whole). A split is read by counting
the examples once, then streaming the file again and keeping the ones of that split, so the training
examples never exist as Python strings: a task encodes them as they come into compact tables
(lmzoo.data.packed). Every problem is a one-line DataError naming the file and its line or record.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterator
from typing import Any

from lmzoo.config.schema import DataConfig
from lmzoo.data.corpus import SPLITS, read_text_file, split_counts
from lmzoo.data.sources import find_sources, text_chunks
from lmzoo.errors import DataError

Pair = tuple[str, str]


def file_lines(path: str) -> Iterator[str]:
    """The lines of a file, read in chunks and split at "\\n" only: str.splitlines() also splits at
    characters that may occur inside a sentence (U+2028, U+0085, form feed...), which would misalign a
    parallel corpus. A file that is empty or only whitespace is a DataError."""
    [source] = find_sources(path).sources
    carry, seen = "", False
    for chunk in text_chunks(source):
        parts = (carry + chunk).split("\n")
        carry = parts.pop()
        for line in parts:
            seen = seen or not line.isspace() and line != ""
            yield line
    if carry:
        seen = seen or not carry.isspace()
        yield carry
    if not seen:
        raise DataError(f"{source.path}: the file is only whitespace")


# ---- sentence pairs ---------------------------------------------------------------------------------


def iter_pairs(config: DataConfig, path: str) -> Iterator[Pair]:
    """Sentence pairs of a TSV file or of a `<path>.<source>`/`<path>.<target>` file pair, in order."""
    if config.format == "tsv":
        for number, line in enumerate(file_lines(path), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
                raise DataError(f"{path} line {number}: expected 'source<TAB>target', got {line[:60]!r}")
            yield fields[0].strip(), fields[1].strip()
        return
    source_path, target_path = config.files_of(path)
    sources, targets = file_lines(source_path), file_lines(target_path)
    for number, (src, tgt) in enumerate(itertools.zip_longest(sources, targets), start=1):
        if src is None or tgt is None:
            have_src = number - 1 + (src is not None) + sum(1 for _ in sources)
            have_tgt = number - 1 + (tgt is not None) + sum(1 for _ in targets)
            raise DataError(
                f"{source_path} has {have_src} lines but {target_path} has {have_tgt}: "
                "parallel files must be aligned line by line"
            )
        if not src.strip() or not tgt.strip():
            empty = source_path if not src.strip() else target_path
            raise DataError(
                f"{empty} line {number}: empty sentence (parallel files need one sentence per line)"
            )
        yield src.strip(), tgt.strip()


def read_pair_file(config: DataConfig, path: str) -> list[Pair]:
    """All sentence pairs of one file (pair): for small files, such as the ones `lmzoo eval --data` reads."""
    return list(iter_pairs(config, path))


# ---- records ----------------------------------------------------------------------------------------


def iter_records(
    path: str, fields: tuple[str, ...], optional: tuple[str, ...] = (), *, nonempty: tuple[str, ...] = ()
) -> Iterator[dict[str, str]]:
    """Records of a JSONL file (line by line) or a JSON array holding string `fields` (and, if present,
    string `optional` fields, "" when absent; `nonempty` ones must hold more than whitespace); a bad
    line or record is named by its number; `input` may be left out (it reads as "")."""
    where, items = "line", _jsonl(path)
    first = next((line for line in file_lines(path) if line.strip()), "")  # a blank file fails here
    if first.lstrip().startswith("["):
        text = read_text_file(path)
        try:
            items = enumerate(json.loads(text), start=1)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {err.lineno}: invalid JSON ({err.msg})") from None
        where = "record"
    for number, record in items:
        if not isinstance(record, dict):
            raise DataError(f"{path} {where} {number}: expected an object with {', '.join(fields)}")
        for field in fields + optional:
            value = record.get(field, "" if field == "input" or field in optional else None)
            if not isinstance(value, str):
                raise DataError(f"{path} {where} {number}: field {field!r} is missing or not a string")
        for field in nonempty:
            if not record[field].strip():
                raise DataError(f"{path} {where} {number}: field {field!r} is empty")
        yield {field: record.get(field, "") for field in fields + optional}


def _jsonl(path: str) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(file_lines(path), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {number}: invalid JSON ({err.msg})") from None


def read_records(
    path: str, fields: tuple[str, ...], optional: tuple[str, ...] = (), *, nonempty: tuple[str, ...] = ()
) -> list[dict[str, str]]:
    records = list(iter_records(path, fields, optional, nonempty=nonempty))
    if not records:
        raise DataError(f"{path}: no records")
    return records


# ---- splits ----------------------------------------------------------------------------------------


class ExampleSplits:
    """The examples (pairs or records) of a config's train / val / test splits, read as they stream: the
    training file is counted once and carved in order by data.split; a split with a file of its own
    (data.val, data.test) reads that file."""

    def __init__(
        self,
        config: DataConfig,
        fields: tuple[str, ...] | None = None,
        optional: tuple[str, ...] = (),
        *,
        nonempty: tuple[str, ...] = (),
    ) -> None:
        self.config, self.fields, self.nonempty = config, fields, nonempty
        for field, keep in (("task", config.tasks or config.task_weights), ("kind", config.kinds)):
            if fields is not None and keep is not None and field not in fields + optional:
                optional = optional + (field,)  # data.tasks / data.kinds / data.task_weights read it
        self.optional = optional
        self.given = {"val": bool(config.val), "test": bool(config.test)}
        self.what = "sentence pairs" if fields is None else "records"
        total = sum(1 for _ in self._read(config.train_files[0]))
        self.counts = split_counts(total, config.split, self.given)
        if not self.counts.get("train"):
            among = "".join(
                f" of data.{name} {keep}"
                for name, keep in (("tasks", config.tasks), ("kinds", config.kinds))
                if fields is not None and keep
            )
            raise DataError(f"the training split has no {self.what}{among}")
        if not self.given["val"] and not self.counts.get("val"):
            self._no_validation()

    def _no_validation(self) -> None:
        raise DataError(
            f"the validation split has no {self.what}: give data.val or raise its fraction in data.split"
        )

    def _read(self, path: str) -> Iterator[Any]:
        if self.fields is None:
            return iter_pairs(self.config, path)
        records = iter_records(path, self.fields, self.optional, nonempty=self.nonempty)
        tasks, kinds = self.config.tasks, self.config.kinds
        return (
            r
            for r in records
            if (tasks is None or r.get("task") in tasks) and (kinds is None or r.get("kind") in kinds)
        )

    def stream(self, split: str) -> Iterator[Any]:
        """The examples of one split, in file order."""
        if self.given.get(split):
            yield from self._read(getattr(self.config, split))
        elif split in self.counts:
            start = sum(self.counts[name] for name in SPLITS[: SPLITS.index(split)] if name in self.counts)
            yield from itertools.islice(
                self._read(self.config.train_files[0]), start, start + self.counts[split]
            )

    def weighted(self, split: str) -> Iterator[Any]:
        """The examples of `split` with each record of a task in data.task_weights repeated that many times."""
        weights, seen = self.config.task_weights or {}, set()
        for example in self.stream(split):
            task = example.get("task") if self.fields is not None else None
            seen.add(task)
            for _ in range(weights.get(task, 1) if task is not None else 1):
                yield example
        unknown = sorted(set(weights) - seen)
        if unknown:
            raise DataError(f"data.task_weights names task {unknown[0]!r}, which no {split} record has")

    def split(self, name: str) -> list[Any]:
        """One split as a list (the held-out ones: BLEU, samples); the validation split must not be empty."""
        examples = list(self.stream(name))
        if name == "val" and not examples:
            self._no_validation()
        return examples

    def sample(self, splits: set[str], limit: int) -> list[Any]:
        """A bounded, deterministic sample of `splits` to fit tokenizers on: all of them when their files are
        at most `limit` bytes, else every k-th example (spread over the whole split)."""
        paths = [self.config.train_files[0]] + [
            getattr(self.config, s) for s in ("val", "test") if self.given[s]
        ]
        size = sum(os.path.getsize(f) for p in paths for f in self._files(p))
        stride = max(1, math.ceil(size / limit))
        return [e for s in SPLITS if s in splits for i, e in enumerate(self.stream(s)) if i % stride == 0]

    def _files(self, path: str) -> list[str]:
        from lmzoo.config.schema import resolve_data_path

        names = self.config.files_of(path) if self.fields is None else [path]
        return [str(resolve_data_path(name)) for name in names]


def read_record_splits(
    config: DataConfig,
    fields: tuple[str, ...],
    optional: tuple[str, ...] = (),
    *,
    nonempty: tuple[str, ...] = (),
) -> dict[str, list[dict[str, str]]]:
    """The records of every split as lists (small record files: reward pairs, RL prompts)."""
    splits = ExampleSplits(config, fields, optional, nonempty=nonempty)
    return {name: splits.split(name) for name in SPLITS if name in splits.counts or splits.given.get(name)}
