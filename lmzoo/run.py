"""`Run`: the one owner of a run directory, and the library verbs every command calls.

    runs/<name>/
      config.yaml            the resolved config that ran (every default filled in)
      tokenizer.json         the tokenizer (and target_tokenizer.json for a separate seq2seq target side)
      base.json              fine-tunes: where the init_from run is (relative) and a hash of its weights
      checkpoints/last|best  weights and training state (lmzoo.checkpoint)
      metrics.jsonl, events.out.tfevents.*   (lmzoo.tracking)

    >>> from lmzoo import Run
    >>> run = Run.open("lstm")                      # a path, a name under ./runs, or None: the newest
    >>> print("".join(run.generate("ROMEO:", max_new_tokens=50)))
    >>> run.evaluate()["loss"], run.score("To be, or not to be").bits_per_char

Nothing outside this module knows the layout. A fine-tune's base run is found through base.json
(relative to the run, so a moved runs/ folder still works) and checked against the hash of the
weights it started from; `base=` (`--base DIR` on the command line) points at a base that moved.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from lmzoo import checkpoint
from lmzoo.config.errors import describe
from lmzoo.config.load import config_to_yaml, parse_config, read_config_file, read_yaml
from lmzoo.config.schema import RunConfig, SampleConfig
from lmzoo.device import pick_device
from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.generate import SamplingOptions
from lmzoo.io import atomic_write_text
from lmzoo.models import build_model
from lmzoo.peft import apply_finetune
from lmzoo.tokenizers import Tokenizer, load_tokenizer

CONFIG_FILE = "config.yaml"
BASE_FILE = "base.json"
TOKENIZER_FILE, TARGET_TOKENIZER_FILE = "tokenizer.json", "target_tokenizer.json"
FREE_WHEN_FINE_TUNING = {"dropout"}  # model keys a fine-tune may change; every other key must match


# ---- configs that start from another run ------------------------------------------------------


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply `key=value` overrides, take an init_from run's sections, validate."""
    return resolve_config(read_config_file(path, overrides), source=str(path))


def resolve_config(raw: Any, *, source: str = "config") -> RunConfig:
    """Validate a raw config; with `init_from`, the model and tokenizer sections come from that run."""
    if isinstance(raw, dict) and raw.get("init_from"):
        raw = _inherit_from_base(raw, Path(str(raw["init_from"])), source)
    return parse_config(raw, source=source)


def _inherit_from_base(raw: dict, base_dir: Path, source: str) -> dict:
    """Take model and tokenizer sections from the base run; a section that contradicts it is an error."""
    if not (base_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{source}: init_from: {base_dir} is not a run directory (no {CONFIG_FILE})")
    base = read_yaml(base_dir / CONFIG_FILE)
    if not isinstance(base, dict) or "model" not in base:
        raise ConfigError(f"{source}: init_from: {base_dir}/{CONFIG_FILE} is not an lmzoo run config")
    merged, model = dict(raw), dict(base["model"])
    for key, value in (raw.get("model") or {}).items():
        # an unknown key falls through to validation, which names it with a "did you mean"
        if key in model and key not in FREE_WHEN_FINE_TUNING and model[key] != value:
            raise ConfigError(
                f"{source}: model.{key}: {value!r} differs from the init_from run's {model.get(key)!r}; "
                "a fine-tune keeps the model it starts from (leave the model section out)"
            )
        model[key] = value
    merged["model"] = model
    for section in ("tokenizer", "target_tokenizer"):
        mine, theirs = raw.get(section), base.get(section)
        # Key by key: restating the base run's values (a copied base config) is no conflict.
        if isinstance(mine, dict) and isinstance(theirs, dict):
            differing = [key for key, value in mine.items() if theirs.get(key) != value]
        else:
            differing = [] if mine is None or mine == theirs else [None]
        if differing:
            where = section if differing[0] is None else f"{section}.{differing[0]}"
            raise ConfigError(
                f"{source}: {where}: differs from the init_from run's; a fine-tune reuses that run's "
                "tokenizer as it is (leave the section out)"
            )
        merged[section] = theirs
    return merged


# ---- finding runs ------------------------------------------------------------------------------


def _is_named(directory: Path, name: str) -> bool:
    """runs/<name> and the runs/<name>-N that later runs of the same config get."""
    suffix = directory.name[len(name) + 1 :]
    return directory.name == name or (directory.name.startswith(name + "-") and suffix.isdigit())


def _weights_hash(run_dir: Path) -> str:
    """sha256 of the weights a fine-tune starts from (the base run's best, else last, checkpoint)."""
    digest = hashlib.sha256()
    with open(checkpoint.best_checkpoint(run_dir) / checkpoint.WEIGHTS, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Run:
    """A run directory: its config, tokenizers, base run, checkpoints, and what can be asked of them."""

    def __init__(
        self, path: Path, config: RunConfig, *, base: str | Path | None = None, restart: bool = False
    ) -> None:
        self.path = Path(path)
        self.config = config
        self.restarting = restart  # start() takes over this directory: it exists but holds no checkpoint
        self._base_override = Path(base) if base is not None else None
        self._tokenizers: dict[str, Tokenizer] | None = None
        self._models: dict[tuple[str, str], nn.Module] = {}
        self.knn: Any = None  # a KnnMixer (lmzoo.retrieval.interpolate) when made by with_knn

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, model={self.config.model.name!r})"

    # ---- opening and creating ----

    @classmethod
    def open(
        cls, where: str | Path | None = None, *, runs_dir: str | Path = "runs", base: str | Path | None = None
    ) -> Run:
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

    @classmethod
    def create(cls, config: RunConfig) -> Run:
        """A new run directory runs/<name> (or <name>-2, -3, ...), with its config and base record written."""
        run = cls.reserve(config)
        run.start()
        return run

    @classmethod
    def reserve(cls, config: RunConfig, *, restart: bool = False) -> Run:
        """The Run a new training run will write, at a free path (<name>, <name>-2, ...); nothing is written
        yet, so a config or data problem found while setting up leaves no directory behind.

        `restart` (--resume of a run that died before its first checkpoint) takes the newest directory of
        this name again when it holds no checkpoint, so a requeued job does not leave empty runs behind."""
        assert config.name is not None
        path, number = Path(config.out_dir) / config.name, 1
        while path.exists():
            number += 1
            path = Path(config.out_dir) / f"{config.name}-{number}"
        previous = path.with_name(config.name if number == 2 else f"{config.name}-{number - 1}")
        if restart and number > 1 and not checkpoint.has_checkpoint(previous):
            return cls(previous, config, restart=True)
        return cls(path, config)

    def start(self) -> None:
        """Create the directory: config.yaml, and for a fine-tune base.json (where its base run is, and a
        hash of the weights it starts from, so a moved or replaced base is noticed)."""
        self.path.mkdir(parents=True, exist_ok=self.restarting)
        self.write_config()
        if self.config.init_from:
            base = Path(self.config.init_from).resolve()
            record = {
                "path": os.path.relpath(base, self.path.resolve()),
                "weights_sha256": _weights_hash(base),
            }
            atomic_write_text(self.path / BASE_FILE, json.dumps(record))

    @classmethod
    def for_resume(cls, config: RunConfig) -> Run | None:
        """The newest run of this config's name that has a checkpoint to resume from, or None."""
        assert config.name is not None
        found = cls.latest(config.out_dir, config.name)
        if found is None:
            return None
        checkpoint.recover_checkpoints(found)
        run = cls.open(found)
        run.check_resumable(config)
        config.name = run.config.name
        run.config = config
        return run

    def check_resumable(self, config: RunConfig) -> None:
        """A resumed run keeps its model and tokenizer; anything else in the config may change."""
        for section in ("model", "tokenizer"):
            new, old = getattr(config, section).model_dump(), getattr(self.config, section).model_dump()
            for key in sorted(set(new) | set(old)):
                if new.get(key) != old.get(key):
                    raise ConfigError(
                        f"--resume: {section}.{key} is {new.get(key)!r} in the config but {old.get(key)!r} in the "
                        "run; a resumed run must keep its model and tokenizer (start a new run instead)"
                    )

    def write_config(self) -> None:
        atomic_write_text(self.path / CONFIG_FILE, config_to_yaml(self.config))

    # ---- what the directory holds ----

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def kind(self) -> str:
        return self.config.kind

    def tokenizers(self) -> dict[str, Tokenizer]:
        """tokenizer.json, and target_tokenizer.json when the run has a separate target side."""
        if self._tokenizers is None:
            found = {TOKENIZER_FILE: load_tokenizer(self.path / TOKENIZER_FILE)}
            if (self.path / TARGET_TOKENIZER_FILE).is_file():
                found[TARGET_TOKENIZER_FILE] = load_tokenizer(self.path / TARGET_TOKENIZER_FILE)
            self._tokenizers = found
        return self._tokenizers

    def save_tokenizers(self, source: Tokenizer, target: Tokenizer | None = None) -> None:
        files = {TOKENIZER_FILE: source}
        if target is not None and target is not source:
            files[TARGET_TOKENIZER_FILE] = target
        for filename, tokenizer in files.items():
            tokenizer.save(self.path / filename)
        self._tokenizers = files

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer (the source side of a seq2seq run)."""
        return self.tokenizers()[TOKENIZER_FILE]

    @property
    def target_tokenizer(self) -> Tokenizer | None:
        """seq2seq runs: the target side (the same object when shared); None for language models."""
        if self.kind != "seq2seq":
            return None
        return self.tokenizers().get(TARGET_TOKENIZER_FILE, self.tokenizer)

    @property
    def vocab_size(self) -> int | tuple[int, int]:
        target = self.target_tokenizer
        return self.tokenizer.vocab_size if target is None else (self.tokenizer.vocab_size, target.vocab_size)

    def checkpoint(self, tag: str = "best") -> Path:
        """checkpoints/<tag>; 'best' falls back to 'last' for a run that never evaluated."""
        if tag not in ("best", "last"):
            raise ConfigError(f"--checkpoint must be best or last, got {tag!r}")
        return (
            checkpoint.best_checkpoint(self.path)
            if tag == "best"
            else checkpoint.checkpoint_dir(self.path, tag)
        )

    def info(self, tag: str = "best") -> dict[str, Any]:
        return checkpoint.read_info(self.checkpoint(tag))

    # ---- the base run of a fine-tune ----

    @property
    def base_dir(self) -> Path | None:
        """Where the init_from run is now: --base, else base.json (relative to this run), else init_from."""
        if not self.config.init_from:
            return None
        record = checkpoint.read_json(self.path / BASE_FILE)
        candidates = [self._base_override] if self._base_override is not None else []
        if record.get("path"):
            candidates.append(self.path / record["path"])
        candidates.append(Path(self.config.init_from))
        for candidate in candidates:
            if (candidate / CONFIG_FILE).is_file():
                self._check_base_weights(candidate, record.get("weights_sha256"))
                return candidate
        looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
        raise CheckpointError(
            f"{self.path}: its base run (init_from) is missing; looked for {looked}. "
            "Pass --base DIR to say where it is now"
        )

    def _check_base_weights(self, base_dir: Path, expected: str | None) -> None:
        if expected is not None and _weights_hash(base_dir) != expected:
            raise CheckpointError(
                f"{base_dir} is not the base run {self.path} was fine-tuned from (its weights differ); "
                "pass --base DIR with the right one"
            )

    @property
    def base(self) -> Run | None:
        """The init_from run this run was fine-tuned from (None for a run trained from scratch)."""
        base_dir = self.base_dir
        return None if base_dir is None else Run.open(base_dir)

    # ---- models ----

    def initial_model(
        self,
        device: torch.device | str = "cpu",
        *,
        vocab_size: int | tuple[int, int] | None = None,
        base_weights: bool = True,
    ) -> nn.Module:
        """The model this run starts from: fresh, or the base run's weights; then LoRA or adapters as
        `finetune` says. `vocab_size` defaults to the saved tokenizers'; `base_weights=False` skips
        loading the base weights (the caller overwrites every tensor)."""
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
        return model

    def model(self, checkpoint_tag: str = "best", device: torch.device | str = "cpu") -> nn.Module:
        """The trained model in eval mode with checkpoint `checkpoint_tag` loaded (cached per device)."""
        key = (checkpoint_tag, str(device))
        if key not in self._models:
            ckpt = self.checkpoint(checkpoint_tag)
            adapter_only = (ckpt / checkpoint.ADAPTER).is_file()
            # A LoRA/adapter checkpoint holds only its own tensors: the frozen base comes from the base run.
            model = (
                self.initial_model(device)
                if adapter_only
                else build_model(self.config.model, self.vocab_size)
            )
            checkpoint.load_checkpoint_weights(model, ckpt)
            self._models[key] = model.to(device).eval()
        plain = self._models[key]
        return plain if self.knn is None else self.knn.mixed(plain, checkpoint_tag)

    # ---- the library verbs ----

    def sampling(self, **overrides: Any) -> SamplingOptions:
        """Sampling options: the run's `sample:` section with the given (non-None) values on top, validated."""
        given = {key: value for key, value in overrides.items() if value is not None}
        try:
            merged = SampleConfig.model_validate({**self.config.sample.model_dump(), **given})
        except ValidationError as err:
            raise ConfigError(describe(err, SampleConfig, ())) from None
        fields = merged.model_dump(exclude={"prompt"})
        return SamplingOptions(**{**fields, "stop": tuple(fields["stop"])})

    def generate(
        self,
        prompt: str,
        *,
        checkpoint_tag: str = "best",
        device: str = "auto",
        seed: int | None = None,
        warn: Callable[[str], None] | None = None,
        **sampling: Any,
    ) -> Iterator[str]:
        """Stream the continuation of `prompt` (language models) or its translation (seq2seq), as text pieces."""
        from lmzoo.generate import generate
        from lmzoo.translate import translate_stream

        options = self.sampling(**sampling)
        model = self.model(checkpoint_tag, pick_device(device))
        generator = None
        if seed is not None:
            generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        if self.kind == "seq2seq":
            return translate_stream(
                model,
                self.tokenizer,
                self.target_tokenizer,
                prompt,
                max_len=self._target_limit(options.max_new_tokens),
                options=options,
                generator=generator,
                warn=warn,
            )
        return generate(model, self.tokenizer, prompt, options, generator=generator, warn=warn)

    def translate(
        self,
        text: str,
        *,
        beam: int = 5,
        n_best: int = 1,
        length_penalty: float = 1.0,
        max_new_tokens: int | None = None,
        checkpoint_tag: str = "best",
        device: str = "auto",
        warn: Callable[[str], None] | None = None,
    ) -> list[tuple[str, float]]:
        """seq2seq runs: the `n_best` beam-search translations of `text` with their scores."""
        from lmzoo.translate import translate

        if self.kind != "seq2seq":
            raise ConfigError(f"{self.path} is a language model; translate needs a seq2seq run")
        if beam < 1 or not 1 <= n_best <= beam:
            raise ConfigError("--beam must be >= 1 and --n-best between 1 and --beam")
        model = self.model(checkpoint_tag, pick_device(device))
        return translate(
            model,
            self.tokenizer,
            self.target_tokenizer,
            text,
            max_len=self._target_limit(max_new_tokens),
            beam=beam,
            length_penalty=length_penalty,
            n_best=n_best,
            warn=warn,
        )

    def _target_limit(self, max_new_tokens: int | None) -> int:
        return min(self.config.data.max_len, max_new_tokens or self.config.data.max_len)

    def evaluate(
        self,
        data: str | Path | None = None,
        split: str = "val",
        *,
        beam: int = 5,
        checkpoint_tag: str = "best",
        device: str = "auto",
    ) -> dict[str, float]:
        """Loss and perplexity on a text file or the run's val/test split; seq2seq runs add greedy and beam BLEU."""
        from lmzoo.evaluate import evaluate_run

        return evaluate_run(
            self, data=data, split=split, beam=beam, checkpoint_tag=checkpoint_tag, device=pick_device(device)
        )

    def score(
        self,
        text: str,
        *,
        source: str | None = None,
        checkpoint_tag: str = "best",
        device: str = "auto",
        top_k: int = 5,
    ) -> Any:
        """Per-token log-probabilities of `text` (for seq2seq runs: of the target given `source`)."""
        from lmzoo.inspect import score_text

        return score_text(
            self, text, source=source, checkpoint_tag=checkpoint_tag, device=pick_device(device), top_k=top_k
        )

    def with_knn(
        self, index: str | Path, *, k: int = 1024, lmbda: float = 0.25, temperature: float = 1.0
    ) -> Run:
        """This run mixed with a kNN-LM datastore (`lmzoo index`): the same evaluate, score and generate,
        with every next-token distribution interpolated with the datastore's (`mixed.knn` holds it)."""
        from lmzoo.retrieval.interpolate import KnnMixer

        mixed = copy.copy(self)  # shares the plain models and tokenizers
        mixed.knn = KnnMixer(self, index, k=k, lmbda=lmbda, temperature=temperature)
        return mixed

    def retrieve(self, query: str, index: str | Path, k: int = 4) -> list[Any]:
        """The `k` best BM25 passages (`lmzoo rag index`) for `query` that fit this run's context."""
        from lmzoo.retrieval.rag import retrieve

        return retrieve(self, query, index, k)

    def merge(self, out: str | Path | None = None) -> Run:
        """Fold a LoRA run into a plain run (config without init_from/finetune, full weights)."""
        from lmzoo.peft import merge_finetune

        if self.knn is not None:
            raise ConfigError("merge works on a plain run, not one mixed with a datastore")
        if self.config.finetune is None or self.config.finetune.method == "full":
            raise CheckpointError(f"{self.path} is not a LoRA run; its weights are already plain")
        if self.config.finetune.method == "adapter":
            raise CheckpointError(
                f"{self.path} uses adapters, which add layers and cannot be folded into the base"
            )
        model = merge_finetune(self.model("best"))
        self._models.clear()
        target = Path(out) if out is not None else None
        if target is not None and target.exists():
            raise CheckpointError(f"{target} already exists; choose another --out")
        name = target.name if target is not None else f"{self.name}-merged"
        config = self.config.model_copy(
            update={
                "init_from": None,
                "finetune": None,
                "name": name,
                "out_dir": str(target.parent if target else self.path.parent),
            }
        )
        merged = Run.create(config)
        merged.save_tokenizers(self.tokenizer, self.target_tokenizer)
        checkpoint.save_checkpoint(
            merged.path, "best", model, info={**self.info(), "merged_from": str(self.path)}
        )
        return merged
