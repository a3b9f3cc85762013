"""BM25 passage retrieval over a folder of .txt / .md files (bm25s), each passage keeping its file and lines.

    DIR/
      manifest.json     the folder, the chunking, the number of files and passages
      passages.jsonl    {"text", "file" (relative to the folder), "lines": [first, last]} per passage
      bm25/             the bm25s index (sparse term scores and vocabulary)

Files are cut into passages of whole lines, about `passage_chars` characters each, consecutive passages
sharing `overlap_lines` lines so a sentence on a boundary is whole in one of them. The index is written
into a temp directory and renamed into place: it exists whole or not at all.

    >>> index = Bm25Index.load("rag_index")
    >>> for p in index.search("the king's crown", k=3): print(p.file, p.lines, p.score)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lmzoo.errors import CheckpointError, ConfigError, DataError
from lmzoo.retrieval import MISSING, check_version
from lmzoo.retrieval.staging import staged_directory

try:
    import bm25s
except ImportError as err:  # without the `retrieval` extra: one line, not a traceback
    raise ConfigError(MISSING.format(err.name)) from None

FORMAT = "lmzoo-bm25-index"
VERSION = 1  # the manifest's format version this lmzoo writes and reads (older ones too, when there are)
MANIFEST, PASSAGES, BM25_DIR = "manifest.json", "passages.jsonl", "bm25"
SUFFIXES = (".txt", ".md")


@dataclass
class Passage:
    """A retrieved piece of a document: its text, file (relative to the indexed folder), line span
    (first, last; 1-based, inclusive) and BM25 score (0 for a passage that was not searched for)."""

    text: str
    file: str
    lines: tuple[int, int]
    score: float = 0.0

    @property
    def source(self) -> str:
        return f"{self.file}:{self.lines[0]}-{self.lines[1]}"


def chunk_lines(text: str, file: str, *, passage_chars: int = 512, overlap_lines: int = 1) -> list[Passage]:
    """Whole-line passages of about `passage_chars` characters; consecutive ones share `overlap_lines`."""
    lines = text.splitlines(keepends=True)
    passages, start = [], 0
    while start < len(lines):
        end, size = start, 0
        while end < len(lines) and (size < passage_chars or end == start):
            size += len(lines[end])
            end += 1
        body = "".join(lines[start:end])
        if body.strip():
            passages.append(Passage(body, file, (start + 1, end)))
        if end >= len(lines):
            break
        start = max(start + 1, end - overlap_lines)
    return passages


def read_document(path: Path) -> str:
    """A document's text; a binary or non-UTF-8 file is refused with one line."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    if b"\x00" in raw:
        raise DataError(f"{path}: a binary file among the documents (NUL bytes); remove it or rename it")
    try:
        return raw.decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); convert it or remove it") from None


def document_files(folder: Path) -> list[Path]:
    """The .txt/.md files under `folder` (recursively, sorted, hidden ones skipped)."""
    if not folder.is_dir():
        raise DataError(f"documents folder not found: {folder}")
    entries = [
        p for p in folder.rglob("*") if not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    if not entries:
        raise DataError(f"{folder} is empty; put .txt or .md files in it")
    files = sorted(p for p in entries if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise DataError(f"{folder} has no .txt or .md files ({len(entries)} other entries)")
    return files


def tokenize(texts: list[str]) -> list[list[str]]:
    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class Bm25Index:
    """Passages and their bm25s index; `search` ranks passages for a query."""

    def __init__(
        self, directory: Path, manifest: dict[str, Any], passages: list[Passage], retriever: Any
    ) -> None:
        self.directory, self.manifest, self.passages, self.retriever = (
            directory,
            manifest,
            passages,
            retriever,
        )

    def __len__(self) -> int:
        return len(self.passages)

    @staticmethod
    def build(
        docs: str | Path, out: str | Path, *, passage_chars: int = 512, overlap_lines: int = 1
    ) -> dict[str, Any]:
        """Index the .txt/.md files under `docs` into `out` (refused if it exists); return the manifest."""
        docs, out = Path(docs), Path(out)
        if passage_chars < 1 or overlap_lines < 0:
            name, low = ("passage_chars", 1) if passage_chars < 1 else ("overlap_lines", 0)
            raise ConfigError(f"{name} must be >= {low}", param=name)
        if out.exists():  # before reading the documents; staged_directory checks again
            raise CheckpointError(
                f"{out} already exists; choose another out= or remove it first", param="out"
            )
        files = document_files(docs)
        passages = [
            passage
            for path in files
            for passage in chunk_lines(
                read_document(path),
                path.relative_to(docs).as_posix(),
                passage_chars=passage_chars,
                overlap_lines=overlap_lines,
            )
        ]
        if not passages:
            raise DataError(f"the .txt/.md files under {docs} hold no text (only blank lines)")
        retriever = bm25s.BM25()
        retriever.index(tokenize([p.text for p in passages]), show_progress=False)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "docs": str(docs.resolve()),
            "files": len(files),
            "passages": len(passages),
            "passage_chars": passage_chars,
            "overlap_lines": overlap_lines,
        }
        with staged_directory(out) as tmp:
            retriever.save(str(tmp / BM25_DIR), show_progress=False)
            with open(tmp / PASSAGES, "w", encoding="utf-8") as handle:
                for p in passages:
                    handle.write(json.dumps({"text": p.text, "file": p.file, "lines": list(p.lines)}) + "\n")
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        return manifest

    @classmethod
    def load(cls, directory: str | Path) -> Bm25Index:
        directory = Path(directory)
        try:
            manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(
                f"{directory} is not a passage index (no {MANIFEST}); build one: lmzoo rag index DOCS --out DIR"
            ) from None
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{directory / MANIFEST}: unreadable ({err})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CheckpointError(f"{directory} is not an lmzoo passage index (a kNN-LM datastore?)")
        check_version(
            manifest, directory / MANIFEST, "passage index", VERSION, "build it again with lmzoo rag index"
        )
        try:
            with open(directory / PASSAGES, encoding="utf-8") as handle:
                rows = [json.loads(line) for line in handle]
            retriever = bm25s.BM25.load(str(directory / BM25_DIR), show_progress=False)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{directory}: damaged passage index ({err})") from None
        passages = [Passage(r["text"], r["file"], (r["lines"][0], r["lines"][1])) for r in rows]
        return cls(directory, manifest, passages, retriever)

    def search(
        self, query: str, k: int = 4, *, exclude: Callable[[Passage], bool] | None = None
    ) -> list[Passage]:
        """The `k` best passages for `query` (score > 0, best first), skipping those `exclude` rejects."""
        if not 1 <= k <= len(self.passages):
            raise ConfigError(
                f"asked for {k} passages; the index has {len(self.passages)} (ask for 1 to {len(self.passages)})"
            )
        tokens = tokenize([query])
        if not tokens[0]:
            return []
        found: list[Passage] = []
        want = min(len(self.passages), 4 * k + 16)
        while True:
            docs, scores = self.retriever.retrieve(tokens, k=want, show_progress=False, n_threads=1)
            found = []
            for index, score in zip(docs[0].tolist(), scores[0].tolist(), strict=True):
                passage = replace(self.passages[index], score=float(score))
                if score > 0 and not (exclude and exclude(passage)):
                    found.append(passage)
            if len(found) >= k or want == len(self.passages) or scores[0][-1] <= 0:
                return found[:k]
            want = min(len(self.passages), want * 4)
