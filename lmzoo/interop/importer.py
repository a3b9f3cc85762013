"""A Hugging Face model folder in, an lmzoo run out: `lmzoo import DIR`, and `init_from: hf:DIR`.

The run is a normal one (config.yaml, tokenizer.json, checkpoints/best/model.safetensors), so every
verb works on it and a fine-tune starts from it like from any run. Weights are read with safetensors
alone, one tensor at a time, checked against the shapes config.json implies; an imported vocabulary
gets lmzoo's <pad> row in front (lmzoo.data.pretrained_tokenizer). `init_from: hf:DIR` imports DIR
once, into <out_dir>/<folder name>, and later runs reuse that import while DIR is unchanged.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from lmzoo.data.pretrained_tokenizer import OFFSET
from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.interop.checkpoint_dir import CONFIG, HFCheckpoint
from lmzoo.interop.hf_tokenizer import read_pretrained_tokenizer
from lmzoo.interop.layout import EMBEDDING, HEAD, HF_HEAD, Layout, layout_for_type
from lmzoo.models import build_model
from lmzoo.run import Run
from lmzoo.run.config import parse_config

POSITIONS = "position_embedding.weight"  # a learned position table: a shorter context keeps its first rows
EVAL_WINDOW = 1024  # data.seq_len of an imported run: the window `eval` and `score` read text in


def _fingerprint(checkpoint: HFCheckpoint) -> dict[str, list[int]]:
    """Size and modification time of the folder's config and weight files: what tells a changed folder."""
    files = [checkpoint.path / CONFIG, *checkpoint.files]
    return {file.name: [file.stat().st_size, file.stat().st_mtime_ns] for file in files}


def _model_section(checkpoint: HFCheckpoint, layout: Layout, context_length: int | None) -> dict[str, Any]:
    try:
        section = layout.model_section(checkpoint.config)
    except CheckpointError as err:
        raise CheckpointError(f"{checkpoint.path}/{err}") from None
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{checkpoint.path / CONFIG}: missing or malformed setting ({err})") from None
    if context_length is not None:
        section["context_length"] = context_length
    return {**section, "reserved_ids": OFFSET}


def _load_tensors(model: torch.nn.Module, checkpoint: HFCheckpoint, layout: Layout, tied: bool) -> None:
    """Copy the checkpoint's tensors into `model`, one at a time, each checked; name the first problem."""
    state = model.state_dict()
    pairs = layout.names(model.config)
    if not tied:
        pairs.append((HF_HEAD, HEAD))
    stored = {layout.canonical(name): name for name in checkpoint.names()}
    used = {hf for hf, _ in pairs}
    extra = sorted(
        stored[n]
        for n in set(stored) - used
        if not n.endswith(layout.ignored) and not (tied and n == HF_HEAD)
    )
    if extra:
        raise CheckpointError(
            f"{checkpoint.path}: tensor {extra[0]!r} has no place in a {checkpoint.model_type} model of "
            "this config.json (another architecture, or a config that does not match the weights?)"
        )
    unfilled = set(state) - {ours for _, ours in pairs} - ({HEAD} if tied else set())
    if unfilled:  # a layout that forgot a tensor: never a user's fault, but never a silent random weight
        raise CheckpointError(f"{checkpoint.path}: nothing to fill lmzoo's {sorted(unfilled)[0]!r} from")
    with torch.no_grad():
        for hf, ours in pairs:
            if hf not in stored:
                raise CheckpointError(f"{checkpoint.path}: tensor {hf!r} is missing from the weights")
            tensor = checkpoint.tensor(stored[hf])
            flipped = ours.endswith(layout.transposed)
            value = tensor.t() if flipped else tensor
            want = tuple(state[ours].shape)
            if ours in (EMBEDDING, HEAD):  # lmzoo's <pad> row in front of the vocabulary
                value = torch.cat([value.new_zeros(OFFSET, *value.shape[1:]), value])
            elif ours == POSITIONS and value.shape[0] != want[0]:
                if value.shape[0] < want[0]:
                    raise ConfigError(
                        f"context_length {want[0]} is longer than the {value.shape[0]} positions the model "
                        "learned",
                        param="context_length",
                    )
                value = value[: want[0]]
            if tuple(value.shape) != want:
                shown = (want[0] - OFFSET, *want[1:]) if ours in (EMBEDDING, HEAD) else want
                shown = tuple(reversed(shown)) if flipped else shown
                raise CheckpointError(
                    f"{checkpoint.path}: tensor {hf!r} has shape {tuple(tensor.shape)}, but config.json "
                    f"implies {shown}"
                )
            state[ours].copy_(value)


def import_pretrained(source: str | Path, out: str | Path, *, context_length: int | None = None) -> Run:
    """Import the Hugging Face model folder `source` as a new lmzoo run directory `out`.

    `context_length` shortens the model's context (a decoder's KV cache holds the whole context).
    """
    checkpoint = HFCheckpoint(source)
    layout = layout_for_type(checkpoint.model_type, str(checkpoint.path / CONFIG))
    section = _model_section(checkpoint, layout, context_length)
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise CheckpointError(f"{target} already exists; pass out=DIR with a new directory", param="out")
    raw = {
        "name": target.name,
        "out_dir": str(target.parent),
        "tokenizer": {"kind": "hf"},
        "model": section,
        "data": {"seq_len": min(EVAL_WINDOW, section["context_length"])},
    }
    config = parse_config(raw, source=str(checkpoint.path / CONFIG))
    embedding = next(hf for hf, ours in layout.names(config.model) if ours == EMBEDDING)
    stored = [n for n in checkpoint.names() if layout.canonical(n) == embedding]
    if not stored:
        raise CheckpointError(f"{checkpoint.path}: tensor {embedding!r} is missing from the weights")
    tokenizer = read_pretrained_tokenizer(checkpoint, checkpoint.shape(stored[0])[0])
    model = build_model(config.model, tokenizer.vocab_size)
    _load_tensors(model, checkpoint, layout, bool(section.get("tie_weights")))
    staging = target.with_name(f".{target.name}.import-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        run = Run(staging, config)
        run.start()
        run.save_tokenizers(tokenizer)
        info = {
            "step": 0,
            "imported_from": str(checkpoint.path.resolve()),
            "source": _fingerprint(checkpoint),
        }
        run.save_checkpoint("best", model, info=info)
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Run.open(target)


def init_from_pretrained(location: str, raw: dict[str, Any]) -> str:
    """The run directory `init_from: hf:LOCATION` starts from: an earlier import of that folder under the
    config's out_dir while the folder is unchanged, else a new import at <out_dir>/<folder name>[-N]."""
    checkpoint = HFCheckpoint(Path(location).expanduser())
    source, fingerprint = str(checkpoint.path.resolve()), _fingerprint(checkpoint)
    root, name = Path(str(raw.get("out_dir") or "runs")), checkpoint.path.resolve().name or "imported"
    path, number = root / name, 1
    while path.exists():
        if Run.trained_at(path):
            info = Run.open(path).info("best")
            if info.get("imported_from") == source and info.get("source") == fingerprint:
                return str(path)
        number += 1
        path = root / f"{name}-{number}"
    return str(import_pretrained(checkpoint.path, path).path)
