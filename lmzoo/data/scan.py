"""Scanning a corpus: each source's size, mtime, sha256, lines and documents, kept in the corpus's
scan.json and redone only when a source's size or mtime changes (or, when asked to verify, its hash).

A scan reads every byte once (decompressing .gz) but decodes nothing: counting lines and hashing run at
disk speed. Its line or document counts decide where the splits are carved (lmzoo.data.corpus).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from lmzoo.data.cache import FORMAT, SCAN, VERSION, digest, read_json, write_json
from lmzoo.data.corpus import CorpusPlan, check_counts, route, split_counts
from lmzoo.data.sources import CHUNK, Piece, Source, open_bytes, table_rows
from lmzoo.errors import DataError

Say = Callable[[str], None]


def to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar over bytes: MB/s and the time left."""
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000, disable=not enabled, leave=False
    )


def _scan_source(source: Source, bar: Any) -> dict[str, Any] | None:
    """A source's record (stat, sha256, lines, documents, bytes), or None when it holds no text."""
    record = {**source.stat(), "lines": 0, "documents": 0, "bytes": 0}
    if source.kind in ("parquet", "arrow"):
        handle, hasher = open_bytes(source, hashing=True)
        with handle:
            for block in iter(lambda: handle.read(CHUNK), b""):
                bar.update(len(block))
        record["documents"] = table_rows(source)
        record["sha256"] = hasher.digest.hexdigest() if hasher else ""
        return record if record["documents"] else None
    handle, hasher = open_bytes(source, hashing=True)
    lines = documents = size = 0
    carry, last, seen_text, done = b"", b"\n", False, 0
    with handle:
        while True:
            try:
                block = handle.read(CHUNK)
            except (OSError, EOFError) as err:
                raise DataError(f"{source.path}: cannot decompress ({err})") from None
            if not block:
                break
            size, lines, last = size + len(block), lines + block.count(b"\n"), block[-1:]
            seen_text = seen_text or not block.isspace()
            if source.kind == "jsonl":
                parts = (carry + block).split(b"\n")
                carry = parts.pop()
                documents += sum(1 for part in parts if part.strip())
            assert hasher is not None
            bar.update(hasher.count - done)
            done = hasher.count
    assert hasher is not None
    documents = documents + bool(carry.strip()) if source.kind == "jsonl" else 1
    record.update(
        sha256=hasher.digest.hexdigest(), lines=lines + (last != b"\n"), documents=documents, bytes=size
    )
    if not seen_text or not documents:
        if source.explicit:
            what = "empty" if size == 0 else "only whitespace" if not seen_text else "without records"
            raise DataError(f"{source.path}: the file is {what}")
        return None
    return record


def scan_corpus(plan: CorpusPlan, progress: bool) -> dict[str, Any]:
    """Every source of the corpus scanned: what scan.json holds."""
    found = {role: f.sources for role, f in plan.roles.items()}
    total = sum(s.size for sources in found.values() for s in sources)
    records: dict[str, list[dict[str, Any]]] = {}
    skipped = [path for f in plan.roles.values() for path in f.skipped]
    with progress_bar(total, "scanning", progress) as bar:
        for role, sources in found.items():
            records[role] = []
            for source in sources:
                record = _scan_source(source, bar)
                if record is None:
                    skipped.append(str(source.path))
                else:
                    records[role].append(record)
            if not records[role]:
                raise DataError(f"data.{role}: no file holds any text ({len(sources)} empty files skipped)")
    return {
        "format": FORMAT,
        "version": VERSION,
        "found": {role: [s.stat() for s in sources] for role, sources in found.items()},
        "sources": records,
        "skipped": skipped,
    }


def _changes(saved: dict[str, Any], plan: CorpusPlan) -> str | None:
    """What differs between the sources a scan saw and those there now (None: nothing)."""
    for role, found in plan.roles.items():
        before = {r["path"]: r for r in saved.get("found", {}).get(role, [])}
        now = {s.stat()["path"]: s.stat() for s in found.sources}
        for path, stat in now.items():
            if path not in before:
                return f"{path} is new"
            if before[path] != stat:
                return f"{path} changed"
        for path in before:
            if path not in now:
                return f"{path} is gone"
    return None


def current_scan(plan: CorpusPlan, *, verify: bool, progress: bool, say: Say) -> dict[str, Any]:
    """scan.json when the sources are as it saw them (and, with `verify`, hash the same); else a new scan."""
    saved = read_json(plan.root / SCAN)
    usable = saved is not None and saved.get("version") == VERSION and saved.get("format") == FORMAT
    change = _changes(saved, plan) if usable and saved is not None else None
    if usable and saved is not None and change is None and not verify:
        return saved
    scan = scan_corpus(plan, progress)
    if usable and saved is not None:
        if change is not None:
            say(f"notice: {change} since the corpus was prepared; preparing it again")
        elif verify and _hashes(saved) != _hashes(scan):
            changed = next(p for p, h in _hashes(scan).items() if _hashes(saved).get(p) != h)
            say(f"notice: {changed} has new content (same size and time); preparing it again")
    write_json(plan.root / SCAN, scan)
    return scan


def _hashes(scan: dict[str, Any]) -> dict[str, str]:
    return {r["path"]: r["sha256"] for records in scan["sources"].values() for r in records}


@dataclass
class Scanned:
    """A corpus with its scan and the lines or documents of each carved split: what fitting and encoding read."""

    plan: CorpusPlan
    scan: dict[str, Any]
    counts: dict[str, int]

    @property
    def id(self) -> str:
        """A hash of what the scan saw: prepared files and fitted tokenizers are valid for this id only."""
        return digest(self.scan["sources"])

    @property
    def size(self) -> int:
        """Bytes of text (decompressed) of every source."""
        return sum(r["bytes"] or r["size"] for records in self.scan["sources"].values() for r in records)

    def sources(self) -> dict[str, list[Source]]:
        """The sources that hold text, by role (empty ones skipped), as the scan saw them."""
        keep = {r["path"] for records in self.scan["sources"].values() for r in records}
        return {role: [s for s in f.sources if str(s.path) in keep] for role, f in self.plan.roles.items()}

    def route(self) -> Iterator[tuple[str, Piece]]:
        """(split, piece) for all of the corpus's text, in order (lmzoo.data.corpus.route)."""
        return route(self.plan, self.sources(), self.counts)


def scanned(plan: CorpusPlan, *, verify: bool, progress: bool, say: Say, whole: bool = False) -> Scanned:
    """The corpus's current scan and split counts (see `current_scan`, `unit_counts`)."""
    scan = current_scan(plan, verify=verify, progress=progress, say=say)
    return Scanned(plan, scan, unit_counts(plan, scan, whole))


def unit_counts(plan: CorpusPlan, scan: dict[str, Any], whole: bool = False) -> dict[str, int]:
    """Lines or documents of the training sources per carved split (empty for a token-tail split);
    `whole`: everything in "train" (a text read whole: eval --data, score --file, index)."""
    if plan.unit == "tokens":
        return {}
    total = sum(r[plan.unit] for r in scan["sources"]["train"])
    if whole:
        return {"train": total}
    counts = split_counts(total, plan.data.split, plan.given)
    check_counts(counts, plan.unit, total, plan.given)
    return counts
