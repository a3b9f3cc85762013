"""`Run`: the one owner of a run directory, and the library verbs every command calls.

    >>> from lmzoo import Run
    >>> run = Run.open("lstm")                      # a path, a name under ./runs, or None: the newest
    >>> print("".join(run.generate("ROMEO:", max_new_tokens=50)))
    >>> run.evaluate()["loss"], run.score("To be, or not to be").bits_per_char

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
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from pydantic import ValidationError
from torch import nn

from lmzoo.config.errors import describe
from lmzoo.config.schema import RunConfig, SampleConfig
from lmzoo.data.tokenizer import Tokenizer, load_tokenizer
from lmzoo.device import pick_device, pick_precision
from lmzoo.errors import CheckpointError, ConfigError, DataError
from lmzoo.inference.decoding import Decoding, decode
from lmzoo.inference.instructions import InstructionScores
from lmzoo.inference.loaded import LoadedModel
from lmzoo.inference.sampling import SamplingOptions
from lmzoo.inference.scoring import Scored
from lmzoo.io import atomic_write_text
from lmzoo.models import build_model
from lmzoo.models.base import LanguageModel, ZooModel
from lmzoo.models.peft import apply_finetune
from lmzoo.models.reward import RewardModel
from lmzoo.run import checkpoint
from lmzoo.run.config import config_to_yaml, parse_config, read_yaml
from lmzoo.run.layout import BASE_FILE, CONFIG_FILE, METRICS_FILE, TARGET_TOKENIZER_FILE, TOKENIZER_FILE
from lmzoo.run.metrics import History, read_history, read_metrics

if TYPE_CHECKING:
    from lmzoo.data.prepare import PreparedCorpus
    from lmzoo.inference.chat import ChatTemplate
    from lmzoo.inference.engine import Engine

TAGS = ("best", "last")


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


class Run:
    """A run directory: its config, tokenizers, base run, checkpoints, metrics, and what can be asked
    of them."""

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
        base = self.base if adapter_only else None
        return stored + (base.parameter_count() if base is not None else 0)

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

    @property
    def base(self) -> Run | None:
        """The init_from run this run was fine-tuned from (None for a run trained from scratch)."""
        base_dir = self.base_dir
        return None if base_dir is None else Run.open(base_dir)

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
        head = RewardModel(cast(LanguageModel, model)).to(next(model.parameters()).device)
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

    def engine(self, checkpoint_tag: str = "best", device: str = "auto", *, slots: int = 32) -> Engine:
        """A batched decoding engine on this run's model: `engine.generate(prompts, options)` decodes many
        prompts together (lmzoo.inference.engine); options from `sampling(...)`."""
        from lmzoo.inference.engine import Engine

        return Engine(self.load(checkpoint_tag, device), slots)

    def chat_template(self) -> ChatTemplate:
        """How a conversation becomes this run's prompt: an instruction-tuned run's own data.template, the
        template of the run a preference-tuned (DPO) run started from, else the default dialogue one."""
        from lmzoo.inference.chat import DIALOGUE, ChatTemplate

        if self.kind == "seq2seq":
            raise ConfigError(
                f"{self.name} is a seq2seq run: it translates and has no chat template; "
                "send its text to /v1/completions (lmzoo generate) instead"
            )
        if self.config.data.format == "instruct":
            return ChatTemplate.instruct(self.config.data.template)
        if self.config.data.format == "preference":
            try:
                base = self.base
            except CheckpointError:
                base = None
            if base is not None:
                return base.chat_template()
        return DIALOGUE

    def decode(
        self,
        prompt: str | Sequence[int],
        *,
        checkpoint_tag: str = "best",
        device: str = "auto",
        seed: int | None = None,
        top_logprobs: int | None = None,
        cache: str = "dynamic",
        warn: Callable[[str], None] | None = None,
        **sampling: Any,
    ) -> Decoding:
        """Continue `prompt` (text or token ids; seq2seq runs: translate it), one step per token: its
        text, id and, with `top_logprobs`, its probabilities; `finish_reason` once consumed. `sampling`
        holds the options of the run's `sample:` section (max_new_tokens, temperature, top_k, stop...)."""
        options = self.sampling(**sampling)
        lm = self.load(checkpoint_tag, device)
        return decode(lm, prompt, options, seed=seed, top_logprobs=top_logprobs, warn=warn, cache=cache)

    def generate(
        self,
        prompt: str,
        *,
        checkpoint_tag: str = "best",
        device: str = "auto",
        seed: int | None = None,
        cache: str = "dynamic",
        warn: Callable[[str], None] | None = None,
        **sampling: Any,
    ) -> Iterator[str]:
        """Stream the continuation of `prompt` (language models) or its translation (seq2seq), as text pieces."""
        steps = self.decode(
            prompt,
            checkpoint_tag=checkpoint_tag,
            device=device,
            seed=seed,
            cache=cache,
            warn=warn,
            **sampling,
        )
        return (step.text for step in steps if step.text)

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
        from lmzoo.inference.seq2seq import translate

        if self.kind != "seq2seq":
            raise ConfigError(f"{self.path} is a language model; translate needs a seq2seq run")
        if beam < 1:
            raise ConfigError(f"beam must be >= 1, got {beam}", param="beam")
        if not 1 <= n_best <= beam:
            raise ConfigError(f"n_best must be between 1 and the beam ({beam}), got {n_best}", param="n_best")
        lm = self.load(checkpoint_tag, device)
        limit = min(lm.max_target_len, max_new_tokens or lm.max_target_len)
        return translate(
            lm.seq2seq_model, lm.tokenizer, lm.output_tokenizer, text, max_len=limit, beam=beam,
            length_penalty=length_penalty, n_best=n_best, warn=warn,
        )  # fmt: skip

    def prepared(self, data: str | Path | list[str | Path] | None = None) -> PreparedCorpus:
        """A text (a file, folder or glob, read whole into the split "train") or else the run's corpus,
        tokenized by the run's tokenizer into memory-mapped token files: from the cache when it is there."""
        from lmzoo.data.prepare import prepare_corpus, prepare_text

        if data is not None:
            return prepare_text(data, self.tokenizer, cache_dir=self.config.data.cache_dir)
        return prepare_corpus(self.config.data, self.tokenizer)

    def evaluation_tokens(self, data: str | Path | None = None, split: str = "val") -> torch.Tensor:
        """The token ids `evaluate` reads (language models): a text file, folder or glob, or the run's
        val/test split, as a tensor over the prepared token file (read lazily, window by window)."""
        if split not in ("val", "test"):
            raise ConfigError(f"split must be val or test, got {split!r}", param="split")
        ids = self.prepared(data).tensor("train" if data is not None else split)
        if not len(ids):
            raise DataError(f"the run's {split} split is empty; pass data=FILE", param="data")
        return ids

    def evaluate(
        self,
        data: str | Path | None = None,
        split: str = "val",
        *,
        beam: int = 5,
        checkpoint_tag: str = "best",
        device: str = "auto",
    ) -> dict[str, float]:
        """Loss and perplexity on a text file or the run's val/test split; seq2seq runs add greedy and beam
        BLEU. Language models read the text as `score` does: every token after the first."""
        from lmzoo.inference.evaluate import evaluate_pairs
        from lmzoo.inference.scoring import evaluate_stream

        if self.kind != "seq2seq":
            return evaluate_stream(self.load(checkpoint_tag, device), self.evaluation_tokens(data, split))
        from lmzoo.data.example_files import ExampleSplits, read_pair_file

        if split not in ("val", "test"):
            raise ConfigError(f"split must be val or test, got {split!r}", param="split")
        cfg = self.config.data
        pairs = read_pair_file(cfg, str(data)) if data is not None else list(ExampleSplits(cfg).stream(split))
        if not pairs:
            raise DataError(f"the run's {split} split has no sentence pairs; pass data=FILE", param="data")
        return evaluate_pairs(self.load(checkpoint_tag, device), pairs, beam=beam)

    def evaluate_instructions(
        self,
        path: str | Path,
        *,
        max_new_tokens: int = 32,
        reference: str | Path | None = None,
        checkpoint_tag: str = "best",
        device: str = "auto",
    ) -> InstructionScores:
        """Greedy exact match and style rate on instruct records (JSON/JSONL {instruction, input, output},
        optionally `task`), prompts rendered with the run's data.template; with `reference` (a run with
        the same tokenizer), also the KL divergence from it per response."""
        from lmzoo.data.example_files import read_records
        from lmzoo.inference.instructions import INSTRUCTION_FIELDS, evaluate_instructions

        if self.kind == "seq2seq":
            raise ConfigError(f"{self.path} is a seq2seq model; instructions are answered by language models")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}", param="max_new_tokens")
        records = read_records(str(path), INSTRUCTION_FIELDS, ("task",))
        reference_lm = None
        if reference is not None:
            other = Run.open(reference)
            if other.kind != "lm" or other.tokenizer.to_dict() != self.tokenizer.to_dict():
                raise ConfigError(
                    f"{other.path} cannot be the reference: it is not a language model with this run's "
                    "tokenizer",
                    param="reference",
                )
            reference_lm = other.load(checkpoint_tag, device)
        return evaluate_instructions(
            self.load(checkpoint_tag, device),
            records,
            self.config.data.template,
            max_new_tokens=max_new_tokens,
            reference=reference_lm,
            where=str(path),
        )

    def evaluate_preferences(
        self, path: str | Path, *, checkpoint_tag: str = "best", device: str = "auto"
    ) -> dict[str, float]:
        """A reward model run on preference pairs (JSONL {prompt, chosen, rejected}, optionally `kind`): the
        Bradley-Terry loss, pair accuracy (ties count half), margins, and the accuracy of each kind."""
        from lmzoo.data.example_files import read_records
        from lmzoo.inference.preferences import PAIR_FIELDS, encode_pairs, pair_metrics, pair_rewards

        records = read_records(str(path), PAIR_FIELDS, ("kind",), nonempty=("chosen", "rejected"))
        where = pick_device(device)
        model = self.reward_model(checkpoint_tag, where)
        pairs = encode_pairs(self.tokenizer, records, self.config.model.context_len, str(path))
        precision = pick_precision(where, self.config.train.precision)
        chosen, rejected = pair_rewards(
            model, pairs, batch_size=self.config.data.eval_rows, precision=precision
        )
        return {**pair_metrics(chosen, rejected, [r["kind"] for r in records]), "pairs": len(pairs)}

    def score(
        self,
        text: str,
        *,
        source: str | None = None,
        checkpoint_tag: str = "best",
        device: str = "auto",
        top_k: int = 5,
    ) -> Scored:
        """Per-token log-probabilities of `text` (for seq2seq runs: of the target given `source`)."""
        from lmzoo.inference.scoring import score_target, score_text

        if self.kind == "seq2seq" and source is None:
            raise ConfigError("a seq2seq run scores a target given its source: pass source=", param="source")
        if self.kind != "seq2seq" and source is not None:
            raise ConfigError(
                "source is for seq2seq runs; a language model scores the text alone", param="source"
            )
        lm = self.load(checkpoint_tag, device)
        if source is not None:
            return score_target(lm, source, text, top_k=top_k)
        return score_text(lm, text, top_k=top_k)

    def score_file(
        self, path: str | Path, *, checkpoint_tag: str = "best", device: str = "auto", top_k: int = 5
    ) -> Scored:
        """`score` of a text file (language models), read from its prepared token file: equals
        `evaluate(data=path)` and `score` of the file's text."""
        from lmzoo.inference.scoring import score_ids

        if self.kind == "seq2seq":
            raise ConfigError("a seq2seq run scores a target given its source: pass source= and the text")
        prepared = self.prepared(path)
        lm = self.load(checkpoint_tag, device)
        return score_ids(
            lm, prepared.tensor("train"), characters=prepared.characters("train") or 0, top_k=top_k
        )
