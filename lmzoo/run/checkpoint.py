"""Checkpoints: tensors and training state in and out of a run's checkpoints/ folder.

    checkpoints/last/      model.safetensors + state.pt (optimizer, RNG, data position, ...) + info.json
    checkpoints/best/      model.safetensors + info.json of the best validation score
    (LoRA / adapter runs write adapter.safetensors instead of model.safetensors)

The rest of the run directory belongs to lmzoo.run. A checkpoint directory is written whole under
a temporary name and swapped in with renames, so a crash at any moment leaves either the previous
or the new checkpoint complete under its final name. Weights are safetensors; the training state
is read with torch.load(weights_only=True); everything else is JSON or YAML. Nothing in a run
directory can execute code when loaded.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmzoo.errors import CheckpointError
from lmzoo.io import fsync_dir, fsync_tree

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
ADAPTER = (
    "adapter.safetensors"  # LoRA / adapter runs: only the fine-tuned tensors; the base comes from init_from
)
STATE = "state.pt"
INFO = "info.json"


def save_checkpoint(
    run_dir: Path, tag: str, model: nn.Module, *, info: dict[str, Any], train_state: dict | None = None
) -> Path:
    """Write checkpoints/<tag>/ atomically (weights, optional training state, info).

    A model with LoRA or adapters saves only its trainable tensors (adapter.safetensors).
    """
    from safetensors.torch import save_file, save_model

    from lmzoo.models.peft import has_adapters, trainable_state_dict

    root = run_dir / "checkpoints"
    final, tmp, old = root / tag, root / f".{tag}.tmp", root / f".{tag}.old"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        metadata = {"format": "lmzoo", "version": str(FORMAT_VERSION)}
        if has_adapters(model):
            tensors = {k: v.contiguous() for k, v in trainable_state_dict(model).items()}
            save_file(tensors, str(tmp / ADAPTER), metadata=metadata)
        else:
            save_model(model, str(tmp / WEIGHTS), metadata=metadata)
        if train_state is not None:
            torch.save({"format_version": FORMAT_VERSION, **train_state}, tmp / STATE)
        (tmp / INFO).write_text(
            json.dumps({"format_version": FORMAT_VERSION, "saved_at": time.time(), **info})
        )
        fsync_tree(tmp)
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(root)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_checkpoints(run_dir)
        raise CheckpointError(f"could not write checkpoint {final}: {err.strerror or err}") from None
    shutil.rmtree(old, ignore_errors=True)
    return final


def recover_checkpoints(run_dir: Path) -> None:
    """Finish or undo a checkpoint swap that a crash interrupted, and remove partial writes."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return
    for tmp in root.glob(".*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in root.glob(".*.old"):
        final = root / old.name[1 : -len(".old")]
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)
    for stale in run_dir.glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)


def checkpoint_dir(run_dir: Path, tag: str) -> Path:
    """The directory holding checkpoint `tag`, including one a crash left mid-swap (read-only lookup)."""
    root = run_dir / "checkpoints"
    for candidate in (root / tag, root / f".{tag}.old"):
        if (candidate / WEIGHTS).is_file() or (candidate / ADAPTER).is_file():
            return candidate
    raise CheckpointError(f"{run_dir} has no '{tag}' checkpoint (looked for {root / tag / WEIGHTS})")


def stored_parameters(ckpt: Path) -> tuple[int, bool]:
    """(number of values in the checkpoint's weights file, whether it holds only adapter tensors),
    read from the safetensors header: no tensor is loaded."""
    import math

    from safetensors import SafetensorError, safe_open

    adapter = (ckpt / ADAPTER).is_file()
    path = ckpt / (ADAPTER if adapter else WEIGHTS)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys()), adapter
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def load_checkpoint_weights(model: nn.Module, ckpt: Path) -> None:
    """Load a checkpoint directory's weights: the whole model, or (fine-tunes) its adapter tensors."""
    if (ckpt / ADAPTER).is_file():
        load_adapter(model, ckpt / ADAPTER)
    else:
        load_weights(model, ckpt / WEIGHTS)


def load_adapter(model: nn.Module, path: Path) -> None:
    """Load the LoRA / adapter tensors of a fine-tune into a model that has the same adapters applied."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    params = dict(model.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(tensors) != expected:
        extra = sorted(set(tensors) - expected) or sorted(expected - set(tensors))
        raise CheckpointError(
            f"{path}: adapter tensors do not match this model's fine-tuning setup ({extra[0]!r})"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            if params[name].shape != tensor.shape:
                raise CheckpointError(
                    f"{path}: {name} has shape {tuple(tensor.shape)} in the checkpoint but "
                    f"{tuple(params[name].shape)} in the model"
                )
            params[name].copy_(tensor)


def load_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights into `model`, naming the first parameter whose shape differs."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_model

    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    for key, shape in shapes.items():
        if key in expected and expected[key] != shape:
            raise CheckpointError(
                f"{path}: {key} has shape {shape} in the checkpoint but {expected[key]} in the model "
                "(the config or tokenizer does not match these weights)"
            )
    unknown = sorted(set(shapes) - set(expected))
    if unknown:
        raise CheckpointError(
            f"{path}: weights for {unknown[0]!r} have no place in this model (another family?)"
        )
    try:
        missing, _ = load_model(model, str(path), strict=False)
    except (SafetensorError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot load weights ({str(err).splitlines()[0]})") from None
    if missing:  # a set in recent safetensors releases, a list in older ones
        raise CheckpointError(
            f"{path}: no weights for {sorted(missing)[0]!r} (the checkpoint is for another model)"
        )


def _unpickler_reason(err: Exception) -> str:
    """The weights-only unpickler's own reason (e.g. the refused global), without torch's advice."""
    text = str(err)
    if found := re.search(r"GLOBAL ([\w.]+)", text):
        return f"refused global {found.group(1)}"
    if found := re.search(r"WeightsUnpickler error:\s*(.+)", text):
        return found.group(1).strip()[:160]
    return type(err).__name__


def load_train_state(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read state.pt with weights_only=True: tensors and plain containers only, never code."""
    try:
        with warnings.catch_warnings():
            # a foreign file's pickle protocol is not worth a multi-line warning: it loads or is refused
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"training state not found: {path}") from None
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load training state: it is not a file of plain tensors and containers "
            f"({_unpickler_reason(err)}); lmzoo never runs code from a checkpoint"
        ) from None
    except Exception as err:  # RuntimeError and friends for a damaged file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: refused to load training state ({first[:200]})") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path}: not an lmzoo training state")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {state['format_version']} is newer than this lmzoo reads"
        )
    return state


def read_json(path: Path) -> dict[str, Any]:
    """A small JSON file as a dict; {} when it is missing or unreadable (info files are advisory)."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return payload if isinstance(payload, dict) else {}


def read_info(ckpt: Path) -> dict[str, Any]:
    return read_json(ckpt / INFO)


def _weight_files(run_dir: Path) -> list[Path]:
    """Every checkpoint weights file of a run, including one a crash left mid-swap."""
    root = run_dir / "checkpoints"
    return [
        path
        for weights in (WEIGHTS, ADAPTER)
        for pattern in ("*/", ".*.old/")
        for path in root.glob(pattern + weights)
    ]


def has_checkpoint(run_dir: Path) -> bool:
    return bool(_weight_files(run_dir))


def checkpoint_time(run_dir: Path) -> float:
    """When the run last wrote a checkpoint (its directory's time if it has none)."""
    return max((path.stat().st_mtime for path in _weight_files(run_dir)), default=run_dir.stat().st_mtime)


def best_checkpoint(run_dir: Path) -> Path:
    """checkpoints/best, or checkpoints/last for a run that never evaluated."""
    try:
        return checkpoint_dir(run_dir, "best")
    except CheckpointError:
        return checkpoint_dir(run_dir, "last")
