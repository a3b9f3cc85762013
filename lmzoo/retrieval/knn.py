"""kNN-LM datastores: the model's hidden state at every position of a text (key) -> the next token (value).

    DIR/
      manifest.json   the run it belongs to (and a sha256 of that checkpoint's weights), the index kind
                      and its parameters, the data, the size and the build time
      keys.npy        (N, C) float16: what the output layer reads at each position (`model.hidden`)
      values.npy      (N,) int32: the token that followed
      index.faiss     IVF stores only; a flat (exact) store is rebuilt from keys.npy when loaded

The text is read the way `lmzoo eval` reads it (windows of the run's seq_len, recurrent models carrying
their state, the run's precision), so a store's keys are the very states an evaluation queries with.
Small stores get an exact flat index (IndexFlatL2); large ones an inverted-file index over the same
float16 keys (IndexIVFScalarQuantizer with QT_fp16: IndexIVFFlat's results at half its size; about
sqrt(N) lists, `nprobe` of them searched per query). Distances are squared L2, as in Khandelwal et al.
A store is written into a temp directory and renamed into place: it exists whole or not at all.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmzoo.errors import CheckpointError, ConfigError, DataError
from lmzoo.retrieval import MISSING, check_version
from lmzoo.retrieval.staging import staged_directory
from lmzoo.run import Run

try:
    import faiss
    import numpy as np
except ImportError as err:  # without the `retrieval` extra: one line, not a traceback
    raise ConfigError(MISSING.format(err.name)) from None

FORMAT = "lmzoo-knn-datastore"
VERSION = 1  # the manifest's format version this lmzoo writes and reads (older ones too, when there are)
MANIFEST, KEYS, VALUES, INDEX = "manifest.json", "keys.npy", "values.npy", "index.faiss"
FLAT_LIMIT = 131_072  # stores up to this many keys are searched exactly
DEFAULT_NPROBE = 32
TRAIN_PER_LIST = 64  # IVF k-means trains on this many sampled keys per list
ADD_CHUNK = 65_536


def choose_index(size: int, kind: str = "auto") -> dict[str, Any]:
    """The index for a store of `size` keys: flat (exact) up to FLAT_LIMIT, else IVF with ~sqrt(N) lists."""
    if kind not in ("auto", "flat", "ivf"):
        raise ConfigError(f"index must be auto, flat or ivf, got {kind!r}", param="index")
    if kind == "flat" or (kind == "auto" and size <= FLAT_LIMIT):
        return {"kind": "flat"}
    nlist = max(1, min(2 ** round(math.log2(math.sqrt(size))), size // TRAIN_PER_LIST))
    return {
        "kind": "ivf_fp16",
        "nlist": nlist,
        "nprobe": min(DEFAULT_NPROBE, nlist),
        "train_size": min(size, nlist * TRAIN_PER_LIST),
    }


# ---- building -----------------------------------------------------------------------------------


def encode_keys(
    run: Run,
    stream: torch.Tensor,
    keys_path: Path,
    *,
    checkpoint_tag: str,
    device: torch.device,
    batch_size: int | None,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Run the model once over the token ids `stream`; write keys (float16, memory-mapped) to `keys_path`;
    return (keys, values, precision). The ids are read by the scorer's rule, as `lmzoo eval` reads them."""
    from dataclasses import replace

    from tqdm import tqdm

    from lmzoo.device import autocast
    from lmzoo.inference.scoring import read_sequences

    lm = run.load(checkpoint_tag, device)
    if batch_size is not None:
        lm = replace(lm, batch_size=batch_size)
    total = max(0, len(stream) - 1)
    if total == 0:
        raise DataError("the text has fewer than 2 tokens; a datastore needs at least one key")
    values = np.empty(total, dtype=np.int32)
    keys: np.memmap | None = None
    bar = tqdm(total=total, desc="encoding", unit="tok", disable=not progress, leave=False)
    with torch.inference_mode(), autocast(lm.device, lm.precision):
        for batch in read_sequences(lm, [stream]):
            flat = batch.hidden.float().cpu().numpy()
            if keys is None:
                keys = np.lib.format.open_memmap(
                    keys_path, mode="w+", dtype=np.float16, shape=(total, flat.shape[1])
                )
            where = (batch.position - 1).numpy()
            keys[where] = flat
            values[where] = batch.target.cpu().numpy()
            bar.update(len(where))
    bar.close()
    assert keys is not None
    keys.flush()
    return keys, values, lm.precision


def build_faiss(keys: np.ndarray, spec: dict[str, Any], seed: int = 0) -> Any:
    """A FAISS index over `keys` (float16, (N, C)) as `spec` says; IVF lists trained on a seeded sample."""
    dim = keys.shape[1]
    index: Any  # a faiss index
    if spec["kind"] == "flat":
        index = faiss.IndexFlatL2(dim)
    else:
        fp16 = faiss.ScalarQuantizer.QT_fp16  # the keys are float16: stored as they are, half IVFFlat's size
        index = faiss.IndexIVFScalarQuantizer(
            faiss.IndexFlatL2(dim), dim, spec["nlist"], fp16, faiss.METRIC_L2
        )
        sample = np.random.default_rng(seed).choice(len(keys), spec["train_size"], replace=False)
        index.train(np.ascontiguousarray(keys[np.sort(sample)], dtype=np.float32))
        index.nprobe = spec["nprobe"]
    for start in range(0, len(keys), ADD_CHUNK):
        index.add(np.ascontiguousarray(keys[start : start + ADD_CHUNK], dtype=np.float32))
    return index


def build_datastore(
    run: Run,
    files: list[str | Path],
    out: str | Path,
    *,
    checkpoint_tag: str = "best",
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    index: str = "auto",
    shuffle_values: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Build a datastore for `run` over `files` into `out` (refused if it exists); return its manifest.

    `shuffle_values` permutes the values (a control store: right keys, wrong tokens, should not help).
    """
    if run.kind != "lm":
        raise ConfigError(f"{run.path} is a seq2seq run; kNN-LM datastores are for language models")
    stream = run.prepared(files).tensor("train")  # tokenized once, read from its memory-mapped file
    started, cpu_started = time.perf_counter(), time.process_time()
    with staged_directory(Path(out)) as tmp:
        keys, values, precision = encode_keys(
            run, stream, tmp / KEYS, checkpoint_tag=checkpoint_tag, device=torch.device(device),
            batch_size=batch_size, progress=progress,
        )  # fmt: skip
        encoded = time.perf_counter()
        if shuffle_values:
            values = np.random.default_rng(0).permutation(values)
        np.save(tmp / VALUES, values)
        spec = choose_index(len(values), index)
        if spec["kind"] != "flat":
            faiss.write_index(build_faiss(keys, spec), str(tmp / INDEX))
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "run": str(Path(run.path).resolve()),
            "checkpoint": checkpoint_tag,
            "weights_sha256": run.weights_sha256(checkpoint_tag),
            "model": run.config.model.name,
            "data": [str(f) for f in files],
            "size": len(values),
            "dim": int(keys.shape[1]),
            "key_dtype": "float16",
            "distance": "squared_l2",
            "precision": precision,
            "shuffled_values": shuffle_values,
            "index": spec,
            "encode_seconds": round(encoded - started, 2),
            "build_seconds": round(time.perf_counter() - started, 2),
            "build_cpu_seconds": round(time.process_time() - cpu_started, 2),  # all threads; robust to load
            "bytes": sum(p.stat().st_size for p in tmp.iterdir()),
        }
        del keys
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


# ---- loading and searching ----------------------------------------------------------------------


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{directory} is not a kNN datastore (no {MANIFEST}); build one with lmzoo index"
        ) from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an lmzoo kNN datastore manifest")
    check_version(manifest, path, "kNN datastore", VERSION, "build it again with lmzoo index")
    return manifest


@dataclass
class Datastore:
    """A loaded store: FAISS index, values, manifest. `search` returns squared-L2 distances and values."""

    directory: Path
    manifest: dict[str, Any]
    index: Any
    values: torch.Tensor  # (N,) long

    @property
    def size(self) -> int:
        return int(self.manifest["size"])

    @classmethod
    def load(cls, directory: str | Path, run: Run, checkpoint_tag: str = "best") -> Datastore:
        """Open a store for `run`; one built for another model (weights hash differs) is refused."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        if manifest["weights_sha256"] != run.weights_sha256(checkpoint_tag):
            raise CheckpointError(
                f"{directory} was built for another model ({manifest['run']}, {manifest['checkpoint']} "
                f"checkpoint), not {run.path} ({checkpoint_tag}); build one: lmzoo index --run {run.path} ..."
            )
        try:
            keys = np.load(directory / KEYS, mmap_mode="r")
            values = torch.from_numpy(np.load(directory / VALUES).astype(np.int64))
            index: Any  # a faiss index
            if manifest["index"]["kind"] == "flat":
                index = build_faiss(keys, manifest["index"])
            else:
                index = faiss.read_index(str(directory / INDEX))
                index.nprobe = manifest["index"]["nprobe"]
        except (OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{directory}: damaged datastore ({str(err).splitlines()[0]})") from None
        if index.ntotal != len(values) or len(values) != manifest["size"]:
            raise CheckpointError(f"{directory}: damaged datastore (index, values and manifest sizes differ)")
        return cls(directory, manifest, index, values)

    def check_k(self, k: int) -> None:
        if not 1 <= k <= self.size:
            raise ConfigError(
                f"k {k}: must be between 1 and the store's size ({self.size:,} keys in {self.directory})",
                param="k",
            )

    def search(self, queries: torch.Tensor, k: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """(distances (N, k) float32, values (N, k) long, -1 where the index found fewer than k)."""
        flat = queries.reshape(-1, queries.shape[-1]).detach().float().cpu().numpy()
        dists, ids = [], []
        for start in range(0, len(flat), chunk):
            d, i = self.index.search(np.ascontiguousarray(flat[start : start + chunk]), k)
            dists.append(torch.from_numpy(d))
            ids.append(torch.from_numpy(i))
        found = torch.cat(ids) if ids else torch.empty(0, k, dtype=torch.long)
        distances = torch.cat(dists) if dists else torch.empty(0, k)
        values = torch.where(found >= 0, self.values[found.clamp(min=0)], torch.full_like(found, -1))
        return distances, values
