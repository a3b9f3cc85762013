"""`RunDirectory`: what a run directory holds and how it is read: its config, tokenizers, checkpoints,
metrics, the base run of a fine-tune, and the models its checkpoints load into. `lmzoo.run.run.Run`
adds the library verbs on top.

Nothing outside the run package knows the layout (lmzoo.run.layout names the files). A fine-tune's
base run is found through base.json (relative to the run, so a moved runs/ folder still works) and
checked against the hash of the weights it started from; `base=` (`--base DIR` on the command line)
points at a base that moved. Models are loaded once per checkpoint and device (`load`), as a
`LoadedModel` the inference core reads.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from torch import nn

from lmzoo.config.schema import RunConfig
from lmzoo.data.tokenizer import Tokenizer, load_tokenizer
from lmzoo.device import pick_device, pick_precision
from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.inference.loaded import LoadedModel
from lmzoo.io import atomic_write_text
from lmzoo.models import build_model
from lmzoo.models.base import LanguageModel, ZooModel
from lmzoo.models.peft import apply_finetune
from lmzoo.models.reward import RewardModel
from lmzoo.run import checkpoint
from lmzoo.run.config import config_to_yaml, parse_config, read_yaml
from lmzoo.run.layout import BASE_FILE, CONFIG_FILE, METRICS_FILE, TARGET_TOKENIZER_FILE, TOKENIZER_FILE
from lmzoo.run.metrics import History, read_history, read_metrics

TAGS = ("best", "last")
R = TypeVar("R", bound="RunDirectory")  # what open returns: the class it is asked on


def _is_named(directory: Path, name: str) -> bool:
    """runs/<name> and the runs/<name>-N that later runs of the same config get."""
    suffix = directory.name[len(name) + 1 :]
    return directory.name == name or (directory.name.startswith(name + "-") and suffix.isdigit())


def weights_sha256(ckpt: Path) -> str:
    """sha256 over the weight files of one checkpoint directory (full weights and/or adapter tensors)."""
    digest = hashlib.sha256()
    for name in (checkpoint.WEIGHTS, checkpoint.ADAPTER):
        if (ckpt / name).is_file():
            with open(ckpt / name, "rb") as handle:
                for block in iter(partial(handle.read, 1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


class RunDirectory:
    """A run directory: its config, tokenizers, base run, checkpoints, metrics and models."""

    def __init__(self, path: str | Path, config: RunConfig, *, base: str | Path | None = None) -> None:
        self.path = Path(path)
        self.config = config
        self._base_override = Path(base) if base is not None else None
        self._tokenizers: dict[str, Tokenizer] | None = None
        self._loaded: dict[tuple[str, str], LoadedModel] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, model={self.config.model.name!r})"

    # ---- opening ----

    @classmethod
    def open(
        cls: type[R],
        where: str | Path | None = None,
        *,
        runs_dir: str | Path = "runs",
        base: str | Path | None = None,
    ) -> R:
        """A trained run from a path, a name under `runs_dir`, or (None) the newest run there."""
        if where is None:
            found = cls.latest(runs_dir)
            if found is None:
                raise CheckpointError(
                    f"no trained run found under ./{runs_dir}; train one first: lmzoo train configs/lstm.yaml"
                )
            path = found
        else:
            path = Path(where)
            if not path.exists() and (Path(runs_dir) / str(where)).exists():
                path = Path(runs_dir) / str(where)
            if not path.is_dir():
                raise CheckpointError(f"run directory not found: {where}")
        if not (path / CONFIG_FILE).is_file():
            raise CheckpointError(f"{path} is not an lmzoo run (no {CONFIG_FILE})")
        source = str(path / CONFIG_FILE)
        # A trained run's config is complete (init_from resolved when it trained) and its corpus may be gone.
        config = parse_config(read_yaml(path / CONFIG_FILE), source=source, check_files=False)
        return cls(path, config, base=base)

    @classmethod
    def latest(cls, runs_dir: str | Path = "runs", name: str | None = None) -> Path | None:
        """The directory under `runs_dir` with the newest checkpoint; with `name`, only <name> and <name>-N."""
        root = Path(runs_dir)
        if not root.is_dir():
            return None
        runs = [
            d
            for d in root.iterdir()
            if d.is_dir() and checkpoint.has_checkpoint(d) and (name is None or _is_named(d, name))
        ]
        return max(runs, key=checkpoint.checkpoint_time, default=None)

    @staticmethod
    def trained_at(path: Path) -> bool:
        """Whether the directory `path` holds a checkpoint (without reading its config)."""
        return checkpoint.has_checkpoint(path)

    @staticmethod
    def checkpoint_time_at(path: Path) -> float:
        """When the run at `path` last wrote a checkpoint (without reading its config)."""
        return checkpoint.checkpoint_time(path)

    # ---- the directory ----

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def metrics_path(self) -> Path:
        """metrics.jsonl, which training appends to (TensorBoard's event files go in the run directory)."""
        return self.path / METRICS_FILE

    def config_text(self) -> str:
        """config.yaml as it is on disk."""
        return (self.path / CONFIG_FILE).read_text(encoding="utf-8")

    def write_config(self) -> None:
        atomic_write_text(self.path / CONFIG_FILE, config_to_yaml(self.config))

    def start(self, *, exist_ok: bool = False) -> None:
        """Create the directory: config.yaml, and for a fine-tune base.json (where its base run is, and a
        hash of the weights it starts from, so a moved or replaced base is noticed)."""
        self.path.mkdir(parents=True, exist_ok=exist_ok)
        self.write_config()
        if self.config.init_from:
            base = Path(self.config.init_from).resolve()
            record = {
                "path": os.path.relpath(base, self.path.resolve()),
                "weights_sha256": weights_sha256(checkpoint.best_checkpoint(base)),
            }
            atomic_write_text(self.path / BASE_FILE, json.dumps(record))

    def metrics(self) -> list[dict[str, Any]]:
        """Every record of metrics.jsonl, in file order."""
        return read_metrics(self.metrics_path)

    def history(self) -> History:
        """metrics.jsonl as one continuous history (resumed segments stitched in step order)."""
        return read_history(self.metrics_path)

    # ---- tokenizers, by role ----

    def tokenizers(self) -> dict[str, Tokenizer]:
        """{"source": the tokenizer, "target": the seq2seq target side (the same object when shared)};
        language models have no "target"."""
        if self._tokenizers is None:
            source = load_tokenizer(self.path / TOKENIZER_FILE)
            found = {"source": source}
            if self.kind == "seq2seq":
                target_file = self.path / TARGET_TOKENIZER_FILE
                found["target"] = load_tokenizer(target_file) if target_file.is_file() else source
            self._tokenizers = found
        return self._tokenizers

    def save_tokenizers(self, source: Tokenizer, target: Tokenizer | None = None) -> None:
        source.save(self.path / TOKENIZER_FILE)
        if target is not None and target is not source:
            target.save(self.path / TARGET_TOKENIZER_FILE)
        self._tokenizers = {"source": source} if target is None else {"source": source, "target": target}

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer (the source side of a seq2seq run)."""
        return self.tokenizers()["source"]

    @property
    def target_tokenizer(self) -> Tokenizer | None:
        """seq2seq runs: the target side (the same object when shared); None for language models."""
        return self.tokenizers().get("target")

    @property
    def vocab_size(self) -> int | tuple[int, int]:
        target = self.target_tokenizer
        return self.tokenizer.vocab_size if target is None else (self.tokenizer.vocab_size, target.vocab_size)

    # ---- checkpoints ----

    def checkpoint(self, tag: str = "best") -> Path:
        """checkpoints/<tag>; 'best' falls back to 'last' for a run that never evaluated."""
        if tag not in TAGS:
            raise ConfigError(f"checkpoint_tag must be best or last, got {tag!r}", param="checkpoint_tag")
        if tag == "best":
            return checkpoint.best_checkpoint(self.path)
        return checkpoint.checkpoint_dir(self.path, tag)

    def has_checkpoint(self) -> bool:
        return checkpoint.has_checkpoint(self.path)

    def checkpoint_time(self) -> float:
        return checkpoint.checkpoint_time(self.path)

    def info(self, tag: str = "best") -> dict[str, Any]:
        """info.json of a checkpoint: step, validation scores, tokens seen, ... ({} when unreadable)."""
        return checkpoint.read_info(self.checkpoint(tag))

    def tokens_seen(self, tag: str = "best") -> int | None:
        """Training tokens up to checkpoint `tag`, as counted by training (None: not recorded)."""
        value = self.info(tag).get("tokens_seen")
        return None if value is None else int(value)

    def parameter_count(self, tag: str = "best") -> int:
        """Parameters of the checkpoint's model, read from the safetensors headers (no weights loaded):
        a LoRA/adapter run counts its base's weights and its own tensors."""
        stored, adapter_only = checkpoint.stored_parameters(self.checkpoint(tag))
        base_dir = self.base_dir if adapter_only else None
        return stored + (RunDirectory.open(base_dir).parameter_count() if base_dir is not None else 0)

    def weights_sha256(self, tag: str = "best") -> str:
        return weights_sha256(self.checkpoint(tag))

    def save_checkpoint(
        self, tag: str, model: nn.Module, *, info: dict[str, Any], train_state: dict | None = None
    ) -> Path:
        """Write checkpoints/<tag> atomically: weights (adapter tensors only for LoRA/adapter models),
        info.json, and for `last` the training state."""
        return checkpoint.save_checkpoint(self.path, tag, model, info=info, train_state=train_state)

    def load_checkpoint_into(self, model: nn.Module, tag: str = "last") -> None:
        """Load checkpoint `tag`'s weights (or adapter tensors) into `model`, which has this run's shape."""
        checkpoint.load_checkpoint_weights(model, self.checkpoint(tag))

    def train_state(self, device: torch.device | str = "cpu") -> dict[str, Any]:
        """checkpoints/last/state.pt (optimiser, RNG, data position...), read with weights_only=True."""
        return checkpoint.load_train_state(self.checkpoint("last") / checkpoint.STATE, device)

    # ---- the base run of a fine-tune ----

    def base_candidates(self) -> list[Path]:
        """Where the init_from run may be, in the order they are tried: --base, base.json (relative to
        this run), the config's init_from. Reading them opens nothing inside them."""
        if not self.config.init_from:
            return []
        record = checkpoint.read_json(self.path / BASE_FILE)
        candidates = [self._base_override] if self._base_override is not None else []
        if record.get("path"):
            candidates.append(self.path / record["path"])
        candidates.append(Path(self.config.init_from))
        return list(dict.fromkeys(candidates))

    @property
    def base_dir(self) -> Path | None:
        """Where the init_from run is now (the first candidate that is a run), checked against the hash
        of the weights this run started from."""
        if not self.config.init_from:
            return None
        expected = checkpoint.read_json(self.path / BASE_FILE).get("weights_sha256")
        candidates = self.base_candidates()
        for candidate in candidates:
            if (candidate / CONFIG_FILE).is_file():
                if expected is not None and weights_sha256(checkpoint.best_checkpoint(candidate)) != expected:
                    raise CheckpointError(
                        f"{candidate} is not the base run {self.path} was fine-tuned from (its weights "
                        "differ); pass base=DIR with the right one",
                        param="base",
                    )
                return candidate
        looked = ", ".join(str(c) for c in candidates)
        raise CheckpointError(
            f"{self.path}: its base run (init_from) is missing; looked for {looked}. "
            "Pass base=DIR to say where it is now",
            param="base",
        )

    # ---- models ----

    def fresh_model(
        self,
        device: torch.device | str = "cpu",
        *,
        vocab_size: int | tuple[int, int] | None = None,
        base_weights: bool = True,
    ) -> ZooModel:
        """The model this run starts from, without its own checkpoint: built from the config, with the
        base run's weights for a fine-tune, then LoRA or adapters as `finetune` says. `vocab_size`
        defaults to the saved tokenizers'; `base_weights=False` skips loading the base weights (the
        caller overwrites every tensor)."""
        model = build_model(self.config.model, vocab_size or self.vocab_size)
        base_dir = self.base_dir if base_weights else None
        if base_dir is not None:
            start = checkpoint.best_checkpoint(base_dir)
            if (start / checkpoint.ADAPTER).is_file():
                raise CheckpointError(
                    f"init_from: {base_dir} is a LoRA/adapter run; merge it first: lmzoo merge --run {base_dir}"
                )
            checkpoint.load_weights(model, start / checkpoint.WEIGHTS)
        model.to(device)
        if self.config.finetune is not None:
            apply_finetune(model, self.config.finetune)
        return self._with_head(model)

    @property
    def is_reward_model(self) -> bool:
        """A reward model run (train.objective reward): a language model with a scalar head."""
        return self.config.train.objective == "reward"

    def _with_head(self, model: ZooModel) -> ZooModel:
        """The run's network around a built model: a reward model wraps it with its scalar head (typed as
        the model it wraps: the verbs that read a reward model's scalar go through `reward_model`)."""
        if not self.is_reward_model:
            return model
        head = RewardModel(cast(LanguageModel, model), likelihood=self.config.train.reward_likelihood)
        head = head.to(next(model.parameters()).device)
        return cast(ZooModel, head)

    def trained_model(self, tag: str = "best", device: torch.device | str = "cpu") -> ZooModel:
        """A new copy of the model with checkpoint `tag` loaded, in eval mode (not cached)."""
        ckpt = self.checkpoint(tag)
        # A LoRA/adapter checkpoint holds only its own tensors: the frozen base comes from the base run.
        adapter_only = (ckpt / checkpoint.ADAPTER).is_file()
        if adapter_only:
            model = self.fresh_model(device)
        else:
            model = self._with_head(build_model(self.config.model, self.vocab_size))
        checkpoint.load_checkpoint_weights(model, ckpt)
        return model.to(device).eval()

    def load(self, checkpoint_tag: str = "best", device: torch.device | str = "auto") -> LoadedModel:
        """The model of checkpoint `checkpoint_tag` on `device` ("auto": cuda > mps > cpu) with what the
        inference core needs to read text with it; loaded once and cached."""
        if self.is_reward_model:
            raise ConfigError(
                f"{self.path} is a reward model: it scores responses (Run.reward_model); it does not "
                "write or score text"
            )
        where = pick_device(device) if isinstance(device, str) else device
        key = (checkpoint_tag, str(where))
        if key not in self._loaded:
            self._loaded[key] = self._loaded_model(self.trained_model(checkpoint_tag, where), where)
        return self._loaded[key]

    def reward_model(self, checkpoint_tag: str = "best", device: torch.device | str = "cpu") -> RewardModel:
        """The reward model of a run trained with train.objective reward, in eval mode."""
        if not self.is_reward_model:
            raise ConfigError(
                f"{self.path} is not a reward model (train.objective is {self.config.train.objective}); "
                "train one with train.objective: reward"
            )
        model = self.trained_model(checkpoint_tag, pick_device(device) if isinstance(device, str) else device)
        assert isinstance(model, RewardModel)
        return model

    def _loaded_model(self, model: ZooModel, device: torch.device) -> LoadedModel:
        data = self.config.data
        return LoadedModel(
            model=model,
            tokenizer=self.tokenizer,
            target_tokenizer=self.target_tokenizer,
            precision=pick_precision(device, self.config.train.precision),
            window=self.config.seq_len,
            batch_size=data.eval_rows,
            max_target_len=data.max_len,
        )

    def model(self, checkpoint_tag: str = "best", device: torch.device | str = "cpu") -> ZooModel:
        """The trained model in eval mode (the cached `load(...).model`)."""
        return self.load(checkpoint_tag, device).model
