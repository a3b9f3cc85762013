"""Reading a local Hugging Face model directory without `transformers`: config.json, the safetensors
weights (one file or shards listed in model.safetensors.index.json) and the tokenizer files.

Pickled weights (pytorch_model.bin, *.pt, *.pth, *.ckpt) are refused: unpickling runs code, and lmzoo
never runs code from a checkpoint. Every problem is one line naming the file or tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lmzoo.errors import CheckpointError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def read_json_file(path: Path) -> Any:
    """A JSON file's content; a missing or unreadable file is one CheckpointError line."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable JSON file ({err})") from None


class HFCheckpoint:
    """A Hugging Face model directory opened for reading: `config`, tensor names and `tensor(name)`."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory (a Hugging Face model folder is expected)")
        if not (self.path / CONFIG).is_file():
            raise CheckpointError(f"{self.path}: no {CONFIG}; not a Hugging Face model folder")
        config = read_json_file(self.path / CONFIG)
        if not isinstance(config, dict):
            raise CheckpointError(f"{self.path / CONFIG}: expected a JSON object")
        self.config: dict[str, Any] = config
        self.files = self._weight_files()
        self._where = self._tensor_files()

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "unknown"))

    def _weight_files(self) -> list[Path]:
        if (self.path / INDEX).is_file():
            index = read_json_file(self.path / INDEX)
            names = sorted(set((index.get("weight_map") or {}).values())) if isinstance(index, dict) else []
            if not names:
                raise CheckpointError(f"{self.path / INDEX}: no weight_map")
            return [self.path / name for name in names]
        if (self.path / WEIGHTS).is_file():
            return [self.path / WEIGHTS]
        shards = sorted(self.path.glob("model-*.safetensors"))
        if shards:
            return shards
        pickled = sorted(p.name for pattern in PICKLED for p in self.path.glob(pattern))
        if pickled:
            raise CheckpointError(
                f"{self.path / pickled[0]}: pickled weights are refused (loading a pickle runs code); "
                "convert them to model.safetensors first, e.g. with transformers' save_pretrained"
            )
        raise CheckpointError(f"{self.path}: no {WEIGHTS} (nor shards listed in {INDEX})")

    def _tensor_files(self) -> dict[str, Path]:
        """Which file holds each tensor, from the safetensors headers (no tensor is read)."""
        from safetensors import SafetensorError, safe_open

        where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in self.files:
            try:
                with safe_open(str(file), framework="pt") as handle:
                    where.update(dict.fromkeys(handle.keys(), file))
                    self._shapes.update(
                        {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
                    )
            except (SafetensorError, OSError, ValueError) as err:
                raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None
        return where

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from its file's header (nothing is read)."""
        return self._shapes[name]

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Tensor `name` as float32, checked against `shape` when given."""
        from safetensors import SafetensorError, safe_open

        file = self._where.get(name)
        if file is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the weights")
        try:
            with safe_open(str(file), framework="pt") as handle:
                value = handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({err})") from None
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {tuple(value.shape)}, but config.json implies {tuple(shape)}"
            )
        return value.float()

    def json_file(self, name: str) -> dict[str, Any]:
        """A JSON side file (tokenizer_config.json, generation_config.json...) as a dict; {} when absent."""
        path = self.path / name
        if not path.is_file():
            return {}
        content = read_json_file(path)
        return content if isinstance(content, dict) else {}
