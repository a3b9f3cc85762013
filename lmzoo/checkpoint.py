"""The run directory: atomic writes, safe loads, and finding runs.

    runs/<name>/
      config.yaml            the resolved config that ran
      tokenizer.json         the tokenizer (generate never needs the corpus)
      checkpoints/last/      model.safetensors + state.pt (optimizer, RNG, data position, ...) + info.json
      checkpoints/best/      model.safetensors + info.json of the best validation score
      metrics.jsonl, events.out.tfevents.*

A checkpoint directory is written whole under a temporary name and swapped in with renames, so a
crash at any moment leaves either the previous or the new checkpoint complete under its final
name. Weights are safetensors; the training state is read with torch.load(weights_only=True);
everything else is JSON or YAML. Nothing in a run directory can execute code when loaded.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmzoo.errors import CheckpointError

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
ADAPTER = "adapter.safetensors"  # LoRA / adapter runs: only the fine-tuned tensors; the base comes from init_from
STATE = "state.pt"
INFO = "info.json"


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, then rename over it: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write {path}: {err.strerror or err}") from None
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(
    run_dir: Path, tag: str, model: nn.Module, *, info: dict[str, Any], train_state: dict | None = None
) -> Path:
    """Write checkpoints/<tag>/ atomically (weights, optional training state, info).

    A model with LoRA or adapters saves only its trainable tensors (adapter.safetensors).
    """
    from safetensors.torch import save_file, save_model

    from lmzoo.peft import has_adapters, trainable_state_dict

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
        (tmp / INFO).write_text(json.dumps({"format_version": FORMAT_VERSION, "saved_at": time.time(), **info}))
        for child in tmp.iterdir():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(tmp)
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
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
        raise CheckpointError(f"{path}: adapter tensors do not match this model's fine-tuning setup ({extra[0]!r})")
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
        raise CheckpointError(f"{path}: weights for {unknown[0]!r} have no place in this model (another family?)")
    try:
        missing, _ = load_model(model, str(path), strict=False)
    except (SafetensorError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot load weights ({str(err).splitlines()[0]})") from None
    if missing:  # a set in recent safetensors releases, a list in older ones
        raise CheckpointError(f"{path}: no weights for {sorted(missing)[0]!r} (the checkpoint is for another model)")


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
        raise CheckpointError(f"{path}: format version {state['format_version']} is newer than this lmzoo reads")
    return state


def read_info(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / INFO).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# ---- finding and loading runs --------------------------------------------------------------


def new_run_dir(out_dir: str | Path, name: str) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ... if taken: a new run never overwrites an old one."""
    base = Path(out_dir) / name
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{name}-{n}")
    return candidate


def _has_checkpoint(run_dir: Path) -> bool:
    root = run_dir / "checkpoints"
    return any((root / folder / weights).is_file() for tag in ("last", "best") for folder in (tag, f".{tag}.old")
               for weights in (WEIGHTS, ADAPTER))  # a LoRA / adapter run keeps adapter.safetensors only


def _run_time(run_dir: Path) -> float:
    root = run_dir / "checkpoints"
    stamps = [p.stat().st_mtime for weights in (WEIGHTS, ADAPTER) for pattern in ("*/", ".*.old/")
              for p in root.glob(pattern + weights)]
    return max(stamps, default=run_dir.stat().st_mtime)


def latest_run(out_dir: str | Path = "runs", name: str | None = None) -> Path | None:
    """The run under `out_dir` with the newest checkpoint; with `name`, only <name> and <name>-N."""
    root = Path(out_dir)
    if not root.is_dir():
        return None
    runs = [
        d for d in root.iterdir()
        if d.is_dir() and _has_checkpoint(d)
        and (name is None or d.name == name or (d.name.startswith(name + "-") and d.name[len(name) + 1 :].isdigit()))
    ]
    return max(runs, key=_run_time, default=None)


def resolve_run(run: str | Path | None, out_dir: str | Path = "runs") -> Path:
    """A run directory from a path, a name under ./runs, or (None) the newest run."""
    if run is None:
        found = latest_run(out_dir)
        if found is None:
            raise CheckpointError(f"no trained run found under ./{out_dir}; train one first: lmzoo train configs/lstm.yaml")
        return found
    path = Path(run)
    if not path.exists() and (Path(out_dir) / run).exists():
        path = Path(out_dir) / run
    if not path.is_dir():
        raise CheckpointError(f"run directory not found: {run}")
    if not (path / "config.yaml").is_file():
        raise CheckpointError(f"{path} is not an lmzoo run (no config.yaml)")
    return path


@dataclass
class Run:
    """A trained run, ready to sample from or evaluate."""

    path: Path
    config: Any  # RunConfig
    tokenizer: Any  # Tokenizer (the source side of a seq2seq run)
    model: nn.Module
    info: dict[str, Any]
    target_tokenizer: Any = None  # seq2seq: the target side (the same object when shared)


def load_tokenizers(run_dir: Path) -> dict[str, Any]:
    """tokenizer.json, and target_tokenizer.json when the run has a separate target side."""
    from lmzoo.tokenizers import load_tokenizer

    found = {"tokenizer.json": load_tokenizer(run_dir / "tokenizer.json")}
    if (run_dir / "target_tokenizer.json").is_file():
        found["target_tokenizer.json"] = load_tokenizer(run_dir / "target_tokenizer.json")
    return found


def best_checkpoint(run_dir: Path) -> Path:
    """checkpoints/best, or checkpoints/last for a run that never evaluated."""
    try:
        return checkpoint_dir(run_dir, "best")
    except CheckpointError:
        return checkpoint_dir(run_dir, "last")


def initial_model(config: Any, vocab: int | tuple[int, int], device: torch.device | str) -> nn.Module:
    """The model a run starts from: fresh, or with the weights of its `init_from` run; then LoRA or
    adapters as its `finetune` section says."""
    from lmzoo.models import build_model
    from lmzoo.peft import apply_finetune

    model = build_model(config.model, vocab)
    if config.init_from:
        base = Path(config.init_from)
        if not (base / "config.yaml").is_file():
            raise CheckpointError(f"init_from: the base run {base} is missing (it holds the weights this run starts from)")
        ckpt = best_checkpoint(base)
        if (ckpt / ADAPTER).is_file():
            raise CheckpointError(f"init_from: {base} is a LoRA/adapter run; merge it first: lmzoo merge --run {base}")
        load_weights(model, ckpt / WEIGHTS)
    model.to(device)
    if config.finetune is not None:
        apply_finetune(model, config.finetune)
    return model


def load_run(run_dir: str | Path, tag: str = "best", device: torch.device | str = "cpu") -> Run:
    """Rebuild a run's model from its config and tokenizer and load its `tag` weights ('best' falls back to 'last')."""
    from lmzoo.config import RunConfig, read_yaml
    from lmzoo.models import build_model

    run_dir = Path(run_dir)
    config = RunConfig.from_dict(  # the corpus may be gone: generate never needs it
        read_yaml(run_dir / "config.yaml"), source=str(run_dir / "config.yaml"), check_files=False
    )
    tokenizers = load_tokenizers(run_dir)
    tokenizer = tokenizers["tokenizer.json"]
    target = tokenizers.get("target_tokenizer.json", tokenizer) if config.kind == "seq2seq" else None
    ckpt = best_checkpoint(run_dir) if tag == "best" else checkpoint_dir(run_dir, tag)
    vocab = tokenizer.vocab_size if target is None else (tokenizer.vocab_size, target.vocab_size)
    if (ckpt / ADAPTER).is_file():
        model = initial_model(config, vocab, device)  # the frozen base, with LoRA / adapters applied
    else:
        model = build_model(config.model, vocab)
    load_checkpoint_weights(model, ckpt)
    model.to(device).eval()
    return Run(path=run_dir, config=config, tokenizer=tokenizer, model=model, info=read_info(ckpt),
               target_tokenizer=target)


def merge_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Fold a LoRA run into a plain run (config without init_from/finetune, full weights); returns its path."""
    from lmzoo.config import config_to_yaml
    from lmzoo.peft import Adapter, merge_finetune

    run = load_run(run_dir, "best")
    if run.config.finetune is None or run.config.finetune.method == "full":
        raise CheckpointError(f"{run_dir} is not a LoRA run; its weights are already plain")
    if any(isinstance(m, Adapter) for m in run.model.modules()):
        raise CheckpointError(f"{run_dir} uses adapters, which add layers and cannot be folded into the base weights")
    merge_finetune(run.model)
    run_path = Path(run_dir)
    target = Path(out) if out is not None else new_run_dir(run_path.parent, f"{run_path.name}-merged")
    if target.exists():
        raise CheckpointError(f"{target} already exists; choose another --out")
    config = run.config.model_copy(update={"init_from": None, "finetune": None, "name": target.name})
    target.mkdir(parents=True)
    for name, tokenizer in load_tokenizers(run_path).items():
        tokenizer.save(target / name)
    atomic_write_text(target / "config.yaml", config_to_yaml(config))
    save_checkpoint(target, "best", run.model, info={**run.info, "merged_from": str(run_path)})
    return target
