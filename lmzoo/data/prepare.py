"""`lmzoo prepare`: a corpus tokenized once into flat token files per split that every run memory-maps.

Three streaming passes, none of which holds the corpus in memory:

1. scan (lmzoo.data.scan): each source's size, mtime, sha256, lines and documents;
2. fit (lmzoo.data.fit): the tokenizer, on a bounded deterministic sample of the training split;
3. encode (here): text routed to its split (lmzoo.data.corpus), encoded on every core
   (lmzoo.data.encoders), appended to <split>.bin (lmzoo.data.token_files); documents are separated by
   `data.document_end`. A word or BPE vocabulary is mostly fitted while the text is encoded, in one
   pass (lmzoo.data.one_pass).

Prepared corpora live in a cache keyed by corpus and tokenizer (lmzoo.data.cache), shared by every run
that uses them; one process prepares while the others wait, and a prepare that fails leaves nothing
behind that a later run trusts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmzoo.config.schema import DataConfig, TokenizerConfig
from lmzoo.data.bpe_pass import BPE_PASS
from lmzoo.data.cache import (
    FORMAT,
    MANIFEST,
    VERSION,
    check_room,
    digest,
    locked,
    read_json,
    remove_leftovers,
    scratch,
    staged,
    write_json,
)
from lmzoo.data.corpus import plan_corpus
from lmzoo.data.encoders import PARALLEL_BYTES, cores, encode_all, id_dtype
from lmzoo.data.fit import fitted_tokenizer, keep_fit, saved_fit
from lmzoo.data.one_pass import NotInOnePass, OnePass, encode_in_one_pass, in_one_pass
from lmzoo.data.scan import Say, Scanned, scanned, to_stderr
from lmzoo.data.token_files import SplitStats, carve_token_tail, separator_ids, write_splits
from lmzoo.data.tokenizer import Tokenizer
from lmzoo.data.word_pass import WORD_PASS
from lmzoo.errors import DataError

if TYPE_CHECKING:
    import torch

NOTICE_BYTES = 16 << 20  # preparing a smaller corpus takes about a second: it is done without a word


def encode_corpus(
    corpus: Scanned, tokenizer: Tokenizer, directory: Path, *, workers: int, progress: bool
) -> dict[str, SplitStats]:
    """Write <split>.bin for every split into `directory`; return what each holds."""
    dtype = id_dtype(tokenizer.vocab_size)
    separator = np.asarray(separator_ids(tokenizer, corpus.plan.data.document_end), dtype=dtype)
    stats = write_splits(
        corpus,
        directory,
        lambda jobs: encode_all(tokenizer, dtype, jobs, workers),
        separator,
        progress=progress,
    )
    if corpus.plan.unit == "tokens":
        carve_token_tail(corpus.plan, directory, stats, dtype().itemsize)
    return stats


# ---- the prepared corpus --------------------------------------------------------------------------


@dataclass
class PreparedCorpus:
    """A corpus's token files under one tokenizer, with their manifest; splits are memory-mapped."""

    directory: Path
    manifest: dict[str, Any]
    tokenizer: Tokenizer
    fresh: bool = False  # prepared by this call (not found in the cache)
    _maps: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    def count(self, split: str) -> int:
        return int(self.manifest["splits"][split]["tokens"])

    def characters(self, split: str) -> int | None:
        return self.manifest["splits"][split]["characters"]

    def identity(self, split: str) -> str:
        """sha256 of a held-out split's text; else a hash of what defines it (sources' content, split rule)."""
        info = self.manifest["splits"][split]
        return str(info.get("text_sha256") or info["identity"])

    def tokens(self, split: str) -> np.ndarray:
        """The split's token ids, memory-mapped (copy-on-write: writable, but nothing reaches the file)."""
        if split not in self._maps:
            count = self.count(split)
            path = self.directory / self.manifest["splits"][split]["file"]
            self._maps[split] = (
                np.memmap(path, dtype=self.dtype, mode="c", shape=(count,))
                if count
                else np.zeros(0, dtype=self.dtype)
            )
        return self._maps[split]

    def tensor(self, split: str) -> torch.Tensor:
        """The split as a tensor over the mapped file (uint16/uint32; read lazily, slice by slice)."""
        import torch

        return torch.from_numpy(self.tokens(split))


def _usable(directory: Path, scan_id: str, tokenizer_id: str) -> dict[str, Any] | None:
    """The manifest of a complete prepared corpus for this scan and tokenizer, else None."""
    manifest = read_json(directory / MANIFEST)
    if manifest is None or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        return None
    if manifest.get("scan") != scan_id or manifest.get("tokenizer", {}).get("sha256") != tokenizer_id:
        return None
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for info in manifest["splits"].values():
        path = directory / info["file"]
        if not path.is_file() or path.stat().st_size != info["tokens"] * itemsize:
            return None
    return manifest


def _manifest(
    corpus: Scanned, tokenizer: Tokenizer, stats: dict[str, SplitStats], seconds: float
) -> dict[str, Any]:
    plan, scan, scan_id = corpus.plan, corpus.scan, corpus.id
    rule = {"unit": plan.unit, "split": list(plan.data.split), "given": plan.given, **corpus.counts}
    return {
        "format": FORMAT,
        "version": VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 3),
        "corpus": {
            "key": plan.key,
            "train": plan.data.train_files,
            "val": plan.data.val,
            "test": plan.data.test,
            "text_field": plan.data.text_field,
            "document_end": plan.data.document_end,
        },
        "scan": scan_id,
        "sources": scan["sources"],
        "skipped": scan["skipped"],
        "tokenizer": {
            "kind": tokenizer.kind,
            "sha256": digest(tokenizer.payload()),
            "vocab_size": tokenizer.vocab_size,
        },
        "dtype": np.dtype(id_dtype(tokenizer.vocab_size)).name,
        "boundaries": rule,
        "splits": {
            name: {
                "file": f"{name}.bin",
                "tokens": s.tokens,
                "documents": s.documents,
                "characters": s.characters,
                "text_sha256": s.text_sha256,
                "identity": digest(
                    {"scan": scan_id, "rule": rule, "split": name, "end": plan.data.document_end}
                ),
            }
            for name, s in stats.items()
        },
    }


def prepare_corpus(
    data: DataConfig,
    tokenizer: Tokenizer | TokenizerConfig,
    *,
    verify: bool = False,
    force: bool = False,
    progress: bool = False,
    say: Say | None = None,
    workers: int | None = None,
    reuse_only: bool = False,
    whole: bool = False,
) -> PreparedCorpus:
    """The corpus `data` describes, tokenized by `tokenizer` (a fitted one, or a config to fit on the
    corpus), from the cache when it is there and its sources are unchanged, else prepared now.

    `verify` rehashes every source; `force` prepares again; `reuse_only` fails instead of preparing
    (processes that wait for another to prepare); `whole` puts everything in "train" (see prepare_text).
    """
    say = say or to_stderr
    plan = plan_corpus(data)
    with locked(plan.root):
        remove_leftovers(plan.root)
        corpus = scanned(plan, verify=verify, progress=progress, say=say, whole=whole)
        jobs = workers or _workers(corpus)
        if isinstance(tokenizer, TokenizerConfig):
            config, fitted = tokenizer, saved_fit(corpus, tokenizer)
            if fitted is None and not reuse_only and in_one_pass(corpus, config):
                prepared = _prepare_in_one_pass(corpus, config, jobs, progress, say)
                if prepared is not None:
                    return prepared
            tokenizer = fitted or fitted_tokenizer(corpus, config, say=say, workers=jobs)
        tokenizer_id = digest(tokenizer.payload())
        directory = plan.root / f"tok-{tokenizer_id[:16]}"
        manifest = None if force else _usable(directory, corpus.id, tokenizer_id)
        fresh = manifest is None
        if manifest is None:
            if reuse_only:
                raise DataError(
                    f"the prepared corpus {directory} is missing; the process preparing it failed"
                )
            manifest = _prepare(corpus, tokenizer, directory, jobs, progress, say)
    return PreparedCorpus(directory, manifest, tokenizer, fresh)


def _workers(corpus: Scanned) -> int:
    """data.workers, else every core for a corpus large enough to pay for starting them."""
    return corpus.plan.data.workers or (cores() if corpus.size > PARALLEL_BYTES else 1)


def _prepare(
    corpus: Scanned,
    tokenizer: Tokenizer,
    directory: Path,
    workers: int,
    progress: bool,
    say: Say,
    *,
    write: Callable[[Path], dict[str, SplitStats]] | None = None,
    started: float | None = None,
) -> dict[str, Any]:
    """Write the prepared corpus to `directory`: its token files (by `write`, default `encode_corpus`),
    tokenizer and manifest. `started`: when a prepare that already said so began."""
    plan, size = corpus.plan, corpus.size
    if started is None and (size >= NOTICE_BYTES or progress):
        say(f"lmzoo: preparing {plan.describe()} with the {tokenizer.kind} tokenizer -> {directory}")
    itemsize = np.dtype(id_dtype(tokenizer.vocab_size)).itemsize
    check_room(plan.root, size * itemsize // (1 if tokenizer.kind == "char" else 3))
    started = time.perf_counter() if started is None else started
    with staged(directory) as tmp:
        if write is None:
            stats = encode_corpus(corpus, tokenizer, tmp, workers=workers, progress=progress)
        else:
            stats = write(tmp)
        tokenizer.save(tmp / "tokenizer.json")
        seconds = time.perf_counter() - started
        manifest = _manifest(corpus, tokenizer, stats, seconds)
        write_json(tmp / MANIFEST, {**manifest, "complete": True})
    tokens = sum(s.tokens for s in stats.values())
    if size >= NOTICE_BYTES or progress:
        say(
            f"lmzoo: prepared {tokens:,} tokens ({manifest['dtype']}) in {seconds:.1f} s "
            f"({size / 1e6 / max(seconds, 1e-9):,.1f} MB/s)"
        )
    return manifest


PASSES: dict[str, OnePass] = {"word": WORD_PASS, "bpe": BPE_PASS}


def _prepare_in_one_pass(
    corpus: Scanned, config: TokenizerConfig, workers: int, progress: bool, say: Say
) -> PreparedCorpus | None:
    """Prepare with a vocabulary fitted while the text is encoded (lmzoo.data.one_pass); None when the
    text needs two passes."""
    plan, kind = corpus.plan, PASSES[config.kind]
    if corpus.size >= NOTICE_BYTES or progress:
        say(f"lmzoo: preparing {plan.describe()} with the {config.kind} tokenizer, fitted while it encodes")
    check_room(plan.root, corpus.size)  # the provisional files, 4 bytes a word or pre-token
    started = time.perf_counter()
    with scratch(plan.root) as folder:
        try:
            tokenizer, vocabulary, stats = encode_in_one_pass(
                corpus, config, folder, kind, workers=workers, progress=progress
            )
        except NotInOnePass:
            return None
        keep_fit(corpus, config, tokenizer)
        directory = plan.root / f"tok-{digest(tokenizer.payload())[:16]}"

        def write(tmp: Path) -> dict[str, SplitStats]:
            return kind.write(folder, tmp, tokenizer, vocabulary, stats, plan)

        manifest = _prepare(
            corpus, tokenizer, directory, workers, progress, say, write=write, started=started
        )
    return PreparedCorpus(directory, manifest, tokenizer, fresh=True)


def prepare_text(
    entries: str | Path | list[str | Path],
    tokenizer: Tokenizer,
    *,
    cache_dir: str | None = None,
    progress: bool = False,
    say: Say | None = None,
) -> PreparedCorpus:
    """Files, folders or globs read whole (`lmzoo eval --data`, `score --file`, `index`) and prepared with
    `tokenizer`: all their documents, in order, in the split "train"."""
    listed = [str(e) for e in ([entries] if isinstance(entries, (str, Path)) else entries)]
    if not listed:
        raise DataError("data: give at least one text file", param="data")
    data = DataConfig.model_construct(
        train=listed, split=(1.0, 0.0, 0.0), split_by="documents", cache_dir=cache_dir
    )
    return prepare_corpus(data, tokenizer, progress=progress, say=say, whole=True)


def fit_on_corpus(data: DataConfig, config: TokenizerConfig, *, progress: bool = False) -> Tokenizer:
    """A tokenizer of `config` fitted on the corpus as `prepare_corpus` fits it (and kept in its cache)."""
    plan = plan_corpus(data)
    with locked(plan.root):
        corpus = scanned(plan, verify=False, progress=progress, say=to_stderr)
        return fitted_tokenizer(corpus, config, say=to_stderr, workers=_workers(corpus))


def split_text(data: DataConfig, split: str, limit: int) -> str:
    """The first `limit` characters (about) of one split's text, read from the sources as `prepare` reads them."""
    plan = plan_corpus(data)
    with locked(plan.root):
        corpus = scanned(plan, verify=False, progress=False, say=to_stderr)
    parts, size = [], 0
    for name, piece in corpus.route():
        if name == split:
            parts.append(piece.text[: limit - size])
            size += len(parts[-1])
            if size >= limit:
                break
    return "".join(parts)
