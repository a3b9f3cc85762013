"""Corpus inputs: files, globs and folders of text or JSONL (plain or gzip-compressed), parquet files and
saved Hugging Face datasets (with the `parquet` extra), read as documents in bounded chunks.

A text file is one document; a JSONL line, a parquet row or a dataset row is one document (its
`data.text_field`). Text is read in chunks of about CHUNK bytes that end at a line end, so no whole
file is ever held in memory; Windows line ends become "\\n". Every problem is a one-line DataError
that names the file, and for text the line and byte offset.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

from lmzoo.config.schema import resolve_data_path
from lmzoo.errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
TABLE_SUFFIXES = (".parquet",)
KNOWN = "text (.txt, .md, .rst), JSONL (.jsonl), their .gz forms, .parquet, or a saved Hugging Face dataset"
CHUNK = 1 << 22  # bytes read at a time: every reader holds about this much text
GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Source:
    """One input file: where it is, how to read it, and what it was when found."""

    path: Path
    kind: str  # text | jsonl | parquet | arrow
    size: int
    mtime_ns: int
    explicit: bool = False  # named as a file (not found in a folder or by a glob): an empty one is an error

    @property
    def compressed(self) -> bool:
        return self.path.suffix.lower() == ".gz"

    def stat(self) -> dict[str, Any]:
        return {"path": str(self.path), "kind": self.kind, "size": self.size, "mtime_ns": self.mtime_ns}


@dataclass
class Found:
    """The sources of one data entry list, and the empty files of folders and globs that were skipped."""

    sources: list[Source]
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Piece:
    """A run of a document's text; `ends_document` on its last piece."""

    text: str
    ends_document: bool


def is_pattern(entry: str) -> bool:
    return any(c in entry for c in GLOB_CHARS)


def kind_of(path: Path) -> str:
    """How a file is read, from its name (a .gz suffix is looked through); anything else is text."""
    name = path.name.lower()
    base = name[:-3] if name.endswith(".gz") else name
    if base.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if base.endswith(TABLE_SUFFIXES):
        if name.endswith(".gz"):
            raise DataError(f"{path}: parquet files are compressed inside; read the .parquet file itself")
        return "parquet"
    return "text"


def _known(path: Path) -> bool:
    name = path.name.lower()
    base = name[:-3] if name.endswith(".gz") else name
    return base.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES + TABLE_SUFFIXES)


def _source(path: Path, kind: str | None = None) -> Source:
    try:
        info = path.stat()
    except OSError as err:
        raise DataError(f"cannot read corpus file {path}: {err.strerror}") from None
    return Source(path.absolute(), kind or kind_of(path), info.st_size, info.st_mtime_ns)


def _dataset_files(folder: Path) -> list[Path]:
    """The .arrow files of a dataset saved with `datasets`' save_to_disk, in order."""
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        names = [item["filename"] for item in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        names = [p.name for p in sorted(folder.glob("*.arrow"))]
    if not names:
        raise DataError(f"{folder}: a saved dataset without .arrow files")
    return [folder / name for name in names]


def _folder(folder: Path, found: Found) -> None:
    if (folder / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise DataError(
            f"{folder}: a saved dataset with splits {', '.join(splits)}; point data.train at one "
            f"split's folder, e.g. {folder / (splits[0] if splits else 'train')}"
        )
    if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
        found.sources += [_source(p, "arrow") for p in _dataset_files(folder)]
        return
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and _known(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise DataError(f"{folder}: no text files in this folder (looked for {KNOWN})")
    _add_files(files, found)


def _add_files(files: list[Path], found: Found) -> None:
    """Files found by a folder or a glob: empty ones are skipped and counted, not fatal."""
    for path in files:
        source = _source(path)
        if source.size == 0:
            found.skipped.append(str(path))
        else:
            found.sources.append(source)


def find_sources(entries: str | list[str], what: str = "data.train") -> Found:
    """The files that `entries` (files, globs, folders, `lmzoo:` bundled corpora) name, in a fixed order."""
    found = Found([])
    for entry in [entries] if isinstance(entries, str) else entries:
        if is_pattern(entry) and not entry.startswith("lmzoo:"):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(entry), recursive=True))
            if not matches:
                raise DataError(f"{what}: no file matches {entry}")
            for match in matches:
                _folder(match, found) if match.is_dir() else _add_files([match], found)
            continue
        path = resolve_data_path(entry)
        if path.is_dir():
            _folder(path, found)
        elif not path.exists():
            raise DataError(f"corpus file not found: {path}")
        else:
            source = replace(_source(path), explicit=True)
            if source.size == 0:
                raise DataError(f"{path}: the file is empty")
            found.sources.append(source)
    if not found.sources:
        raise DataError(f"{what}: every file is empty ({len(found.skipped)} skipped)")
    return found


# ---- reading ------------------------------------------------------------------------------------


class HashingReader(io.BufferedIOBase):
    """A binary file that hashes (sha256) every byte read from it."""

    def __init__(self, handle: io.BufferedIOBase) -> None:
        super().__init__()
        self.handle, self.digest, self.count = handle, hashlib.sha256(), 0

    def read(self, size: int | None = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        self.count += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        count = self.handle.readinto(buffer)
        self.digest.update(memoryview(buffer)[:count])
        self.count += count
        return count

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.handle.close()
        super().close()


def open_bytes(source: Source, hashing: bool = False) -> tuple[io.BufferedIOBase, HashingReader | None]:
    """The source's (decompressed) bytes, and the reader hashing the file's own bytes when asked."""
    try:
        raw: io.BufferedIOBase = open(source.path, "rb")  # noqa: SIM115 (closed by the caller)
    except OSError as err:
        raise DataError(f"cannot read corpus file {source.path}: {err.strerror}") from None
    hasher = HashingReader(raw) if hashing else None
    inner = hasher or raw
    if source.compressed:
        return gzip.GzipFile(fileobj=inner, mode="rb"), hasher
    return inner, hasher


def raw_blocks(source: Source, hashing: bool = False, size: int = CHUNK) -> Iterator[bytes]:
    """The source's decompressed bytes in blocks; a damaged gzip stream is a one-line DataError."""
    handle, _ = open_bytes(source, hashing)
    with handle:
        while True:
            try:
                block = handle.read(size)
            except (OSError, EOFError, gzip.BadGzipFile) as err:
                raise DataError(f"{source.path}: cannot decompress ({err})") from None
            if not block:
                return
            yield block


def _utf8_cut(data: bytes) -> int:
    """The length of the longest prefix of `data` that does not end inside a UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return len(data) if back == 1 else len(data) - back + 1
        if byte >= 0xC0:  # a lead byte: is its character complete?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= need else len(data) - back
    return len(data)


def text_chunks(source: Source, size: int = CHUNK) -> Iterator[str]:
    """The source's text, decoded and with "\\r\\n" made "\\n", in chunks that end at a line end (unless a
    line is longer than a few chunks, or the file's last line has no end). Undecodable bytes name the
    line and the byte offset."""
    pending, carry, offset = b"", "", 0
    for block in raw_blocks(source, size=size):
        data = pending + block
        cut = _utf8_cut(data)
        try:
            decoded = data[:cut].decode("utf-8")
        except UnicodeDecodeError as err:
            _undecodable(source, offset + err.start, err.reason)
        pending, offset = data[cut:], offset + cut
        text = carry + decoded
        if carry.endswith("\r") or data.find(b"\r", 0, cut) != -1:  # a "\r\n" may span carry and block
            text = text.replace("\r\n", "\n")
        hold = 1 if text.endswith("\r") else 0  # maybe the first half of a "\r\n"
        end = text.rfind("\n", 0, len(text) - hold) + 1
        if end == 0:
            if len(text) < 4 * size:
                carry = text
                continue
            end = len(text) - hold  # a very long line: cut it
        carry = text[end:]
        yield text[:end]
    if pending:
        _undecodable(source, offset, "unexpected end of data")
    if carry:
        yield carry


def _undecodable(source: Source, position: int, reason: str) -> NoReturn:
    """The DataError for the byte at `position`; its line is counted here, as reading needs no count."""
    lines = seen = 0
    for block in raw_blocks(source):
        lines += block[: max(0, position - seen)].count(b"\n")
        seen += len(block)
        if seen >= position:
            break
    raise DataError(f"{source.path}: not UTF-8 text (byte {position}, line {lines + 1}: {reason})")


def read_pieces(source: Source, text_field: str = "text", size: int = CHUNK) -> Iterator[Piece]:
    """The documents of one source as pieces: a text file is one document (line-aligned chunks); a JSONL
    line, parquet row or dataset row is one document each."""
    if source.kind == "text":
        previous: str | None = None
        for chunk in text_chunks(source, size):
            if previous is not None:
                yield Piece(previous, False)
            previous = chunk
        if previous is not None:
            yield Piece(previous, True)
    elif source.kind == "jsonl":
        for _, text in jsonl_records(source, text_field, size):
            yield Piece(text, True)
    else:
        for text in table_texts(source, text_field):
            yield Piece(text, True)


def jsonl_records(source: Source, text_field: str, size: int = CHUNK) -> Iterator[tuple[int, str]]:
    """(line number, text) of every non-blank line of a JSONL file."""
    number = 0
    for chunk in text_chunks(source, size):
        for line in chunk.split("\n")[:-1]:
            number += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise DataError(f"{source.path} line {number}: not JSON ({err})") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                what = "no" if not isinstance(record, dict) or text_field not in record else "a non-string"
                raise DataError(
                    f"{source.path} line {number}: {what} {text_field!r} field (data.text_field names "
                    "the field that holds each document's text)"
                )
            yield number, text


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError(
            "reading parquet files and saved datasets needs pyarrow: pip install 'lmzoo[parquet]' "
            f"(without it lmzoo reads {KNOWN.split(', .parquet')[0]})"
        ) from None
    return pyarrow


def table_texts(source: Source, text_field: str) -> Iterator[str]:
    """The `text_field` column of a parquet file or a dataset's .arrow file, row by row (None: empty)."""
    pa = _pyarrow()
    try:
        if source.kind == "parquet":
            table = pa.parquet.ParquetFile(source.path)
            names = table.schema_arrow.names
            batches = table.iter_batches(columns=[text_field]) if text_field in names else None
        else:
            stream = _arrow_reader(pa, source.path)
            names = stream.schema.names
            batches = stream if text_field in names else None
        if batches is None:
            raise DataError(
                f"{source.path}: no {text_field!r} column (it has {', '.join(names)}); set data.text_field"
            )
        for batch in batches:
            for text in batch.column(batch.schema.get_field_index(text_field)).to_pylist():
                if text is not None and not isinstance(text, str):
                    raise DataError(f"{source.path}: the {text_field!r} column does not hold text")
                yield text or ""
    except pa.ArrowException as err:
        raise DataError(f"{source.path}: cannot read it ({err})") from None


def _arrow_reader(pa: Any, path: Path) -> Any:
    """A dataset's .arrow file: the IPC stream format `datasets` writes, or the IPC file format."""
    try:
        return pa.ipc.open_stream(pa.memory_map(str(path)))
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        return (reader.get_batch(i) for i in range(reader.num_record_batches))


def table_rows(source: Source) -> int:
    """Rows of a parquet file or a dataset .arrow file (from its metadata where it has one)."""
    pa = _pyarrow()
    try:
        if source.kind == "parquet":
            return int(pa.parquet.ParquetFile(source.path).metadata.num_rows)
        return sum(batch.num_rows for batch in _arrow_reader(pa, source.path))
    except pa.ArrowException as err:
        raise DataError(f"{source.path}: cannot read it ({err})") from None
