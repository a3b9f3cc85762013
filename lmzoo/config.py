"""The run schema: YAML -> a typed, validated `RunConfig`.

Every section rejects unknown keys (with a "did you mean"), every value is type-checked, and every
problem is reported as one line naming the key path. The `model:` section is validated against the
config class that the chosen model registered, so each family documents its own options.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from lmzoo.errors import ConfigError

BUNDLED_PREFIX = "lmzoo:"
KERAS_FILTERS = '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n'

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def resolve_data_path(path: str) -> Path:
    """Map `lmzoo:name` to the corpus shipped inside the package; other paths are used as given."""
    if path.startswith(BUNDLED_PREFIX):
        return Path(__file__).parent / "corpora" / path[len(BUNDLED_PREFIX) :]
    return Path(path).expanduser()


def _existing_file(path: str, info: ValidationInfo) -> str:
    resolved = resolve_data_path(path)
    # A trained run is reloaded with check_files=False: sampling from it never needs its corpus.
    if (info.context or {}).get("check_files", True) and not resolved.is_file():
        raise ValueError(f"file not found: {resolved}")
    return path


class DataConfig(Section):
    """Where the text comes from and how it is cut into batches.

    format text: language-model text files. format parallel: aligned sentence files named
    `<path>.<source>` and `<path>.<target>` (one sentence per line). format tsv: one
    `source<TAB>target` pair per line. format instruct: JSON/JSONL records {instruction, input,
    output} (supervised fine-tuning). format preference: JSONL records {prompt, chosen, rejected} (DPO).
    """

    format: Literal["text", "parallel", "tsv", "instruct", "preference"] = "text"
    source: str = "src"  # parallel: suffix of the source-side files
    target: str = "tgt"  # parallel: suffix of the target-side files
    train: str | list[str] = "lmzoo:tinyshakespeare.txt"
    val: str | None = None  # a separate validation file (or prefix); by default split off `train`
    test: str | None = None
    split: tuple[Probability, Probability, Probability] = (0.9, 0.05, 0.05)  # train/val/test, by lines
    max_len: PositiveInt = 100  # seq2seq: training pairs with a longer source or target are skipped
    # instruct: the prompt built from each {instruction, input, output} record; the loss covers only `output`
    template: str = "### Instruction:\n{instruction}\n{input}\n### Response:\n"
    seq_len: PositiveInt | None = None  # None: the model's context length, or 128 for recurrent models
    batch_size: PositiveInt = 32
    eval_batch_size: PositiveInt | None = None  # None: same as batch_size
    # sequential = contiguous truncated-BPTT streams (state carried across batches);
    # random = independent windows at random offsets; auto picks by model family.
    sampling: Literal["auto", "sequential", "random"] = "auto"

    @field_validator("train")
    @classmethod
    def _train_exists(cls, value: str | list[str], info: ValidationInfo) -> str | list[str]:
        paths = [value] if isinstance(value, str) else value
        if not paths:
            raise ValueError("needs at least one file")
        if info.data.get("format", "text") != "text" and len(paths) != 1:
            raise ValueError("parallel and tsv data take one path (a file, or the prefix of a file pair)")
        for path in paths:
            for file in _files_of(path, info.data):
                _existing_file(file, info)
        return value

    @field_validator("val", "test")
    @classmethod
    def _split_file_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            for file in _files_of(value, info.data):
                _existing_file(file, info)
        return value

    @field_validator("template")
    @classmethod
    def _template_fields(cls, value: str) -> str:
        import string

        try:
            names = {field for _, field, _, _ in string.Formatter().parse(value) if field is not None}
        except ValueError as err:
            raise ValueError(f"not a valid template ({err})") from None
        unknown = names - {"instruction", "input"}
        if unknown:
            raise ValueError(f"may use {{instruction}} and {{input}} only, not {{{sorted(unknown)[0]}}}")
        return value

    def files_of(self, path: str) -> list[str]:
        """The file(s) a data path names: itself, or for parallel data its source and target files."""
        return _files_of(path, {"format": self.format, "source": self.source, "target": self.target})

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if abs(sum(value) - 1.0) > 1e-6:
            raise ValueError(f"fractions must add up to 1, they add up to {sum(value):g}")
        if value[0] <= 0:
            raise ValueError("the train fraction must be positive")
        return value

    @property
    def train_files(self) -> list[str]:
        return [self.train] if isinstance(self.train, str) else list(self.train)


def _files_of(path: str, data: dict[str, Any]) -> list[str]:
    if data.get("format") == "parallel":
        return [f"{path}.{data.get('source', 'src')}", f"{path}.{data.get('target', 'tgt')}"]
    return [path]


class CharTokenizerConfig(Section):
    """One token per character seen in the training text."""

    kind: Literal["char"] = "char"
    fit_on: Literal["train", "all"] = "train"  # which text builds the vocabulary


class WordTokenizerConfig(Section):
    """Words split on whitespace, optionally lowercased and stripped of punctuation (Keras-style)."""

    kind: Literal["word"] = "word"
    lowercase: bool = True
    filters: str = KERAS_FILTERS  # characters removed before splitting; "" keeps punctuation
    newline_token: bool = True  # a line end becomes an <eos> token (and decodes back to "\n")
    min_freq: PositiveInt = 1
    max_vocab: PositiveInt | None = None
    fit_on: Literal["train", "all"] = "train"


class BpeTokenizerConfig(Section):
    """Byte-level BPE trained on the corpus with the `tokenizers` library: any text encodes."""

    kind: Literal["bpe"] = "bpe"
    vocab_size: Annotated[int, Field(ge=260)] = 1024
    min_freq: PositiveInt = 2
    fit_on: Literal["train", "all"] = "train"


TOKENIZER_CONFIGS: dict[str, type[Section]] = {
    "char": CharTokenizerConfig,
    "word": WordTokenizerConfig,
    "bpe": BpeTokenizerConfig,
}


class ModelConfig(Section):
    """Base of every model's config class; `name` picks the registered model."""

    name: str

    @property
    def context_len(self) -> int | None:
        """Longest sequence the model can attend over; None for models without a limit."""
        return None

    def check_run(self, run: RunConfig) -> None:
        """Hook for checks that involve other sections (raise ValueError with a message)."""


class TrainConfig(Section):
    """The optimisation loop: steps, optimiser, schedule, precision, evaluation and checkpoints."""

    max_steps: PositiveInt | None = None  # exactly one of max_steps / epochs; default 2000 steps
    epochs: Annotated[float, Field(gt=0)] | None = None
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: Annotated[float, Field(gt=0)] = 1e-3
    min_lr: Annotated[float, Field(ge=0)] = 1e-4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: NonNegInt = 100
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    betas: tuple[Probability, Probability] = (0.9, 0.99)
    eps: Annotated[float, Field(gt=0)] = 1e-8
    momentum: Annotated[float, Field(ge=0)] = 0.0  # sgd only
    grad_clip: Annotated[float, Field(ge=0)] | None = 1.0
    grad_accum: PositiveInt = 1
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    eval_every: PositiveInt = 250
    eval_batches: PositiveInt | None = 50  # None: the whole validation split
    log_every: PositiveInt = 10
    checkpoint_every: PositiveInt | None = None  # None: at every eval
    patience: PositiveInt | None = None  # early stopping: evals without improvement
    best_metric: Literal["loss", "bleu"] = "loss"  # what picks checkpoints/best (bleu: seq2seq only)
    bleu_sentences: NonNegInt = 200  # seq2seq: validation sentences translated for BLEU at each eval
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps
    nan_policy: Literal["stop", "skip"] = "stop"
    dpo_beta: Annotated[float, Field(gt=0)] = 0.1  # DPO: strength of the pull towards the reference model
    compile: bool = False  # torch.compile the model's forward (falls back to eager with a warning)
    strategy: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate (DDP) or shard (FSDP) the model

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        kind = value.split(":", 1)[0]
        if kind not in {"auto", "cpu", "cuda", "mps"}:
            raise ValueError("must be one of auto, cpu, cuda, cuda:N, mps")
        return value

    def resolved_max_steps(self, batches_per_epoch: int) -> int:
        """Optimiser steps to run: `max_steps`, or `epochs` worth of batches, or 2000."""
        if self.max_steps is not None:
            return self.max_steps
        if self.epochs is not None:
            return max(1, round(self.epochs * batches_per_epoch / self.grad_accum))
        return 2000


class FinetuneConfig(Section):
    """How to fine-tune the model loaded with `init_from`: all weights, LoRA, or adapters (lmzoo.peft)."""

    method: Literal["full", "lora", "adapter"] = "full"
    r: PositiveInt = 8  # LoRA rank
    alpha: Annotated[float, Field(gt=0)] = 16.0  # LoRA scale is alpha / r
    dropout: Probability = 0.0  # LoRA rank dropout
    # LoRA: parameter-name patterns (fnmatch) of the weights to adapt
    targets: list[str] = ["*in_proj.weight", "*out_proj.weight", "*weight_ih*", "*weight_hh*"]
    bottleneck: PositiveInt = 16  # adapter width
    positions: list[Literal["ff", "rnn"]] = ["ff", "rnn"]  # adapters after feed-forwards / recurrent layers


class SampleConfig(Section):
    """Defaults for sampling: used by `lmzoo generate` and for the text logged at each eval."""

    prompt: str = ""
    max_new_tokens: PositiveInt = 200
    temperature: Annotated[float, Field(ge=0)] = 0.8
    top_k: PositiveInt | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0


class RunConfig(Section):
    """A whole run: what `lmzoo train` executes and writes to `runs/<name>/config.yaml`."""

    name: str | None = None  # default: the config file's stem
    out_dir: str = "runs"
    seed: int = 1337
    data: DataConfig = DataConfig()
    tokenizer: SerializeAsAny[Section] = CharTokenizerConfig()
    # seq2seq only: a separate target-side tokenizer; None shares `tokenizer` between both sides
    target_tokenizer: SerializeAsAny[Section] | None = None
    model: SerializeAsAny[ModelConfig]
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    init_from: str | None = None  # a run directory: start from its weights, model config and tokenizer
    finetune: FinetuneConfig | None = None  # with init_from: full (default), lora or adapter

    @property
    def seq_len(self) -> int:
        """Training sequence length after defaults: data.seq_len, else the model's context, else 128."""
        return self.data.seq_len or self.model.context_len or 128

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, raw: Any, *, source: str = "config", check_files: bool = True) -> RunConfig:
        """Validate a plain dict (as read from YAML) into a RunConfig; raise ConfigError on any problem.

        `check_files=False` skips the data files' existence checks (for reloading a trained run).
        """
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections, got {_kind(raw)}")
        raw = dict(raw)
        if raw.get("init_from"):
            raw = _inherit_from_run(raw, source, check_files)
        elif raw.get("finetune"):
            raise ConfigError(f"{source}: finetune: needs init_from (the run whose model is fine-tuned)")
        tokenizer_raw = raw.pop("tokenizer", {}) or {}
        model_raw = raw.pop("model", None)
        if model_raw is None:
            raise ConfigError(f"{source}: model: missing section (it needs at least `name:`)")
        tokenizer = _validate_tagged(tokenizer_raw, "tokenizer", "kind", TOKENIZER_CONFIGS, "char", source)
        target_raw = raw.pop("target_tokenizer", None)
        target_tokenizer = (
            None if target_raw is None
            else _validate_tagged(target_raw, "target_tokenizer", "kind", TOKENIZER_CONFIGS, "char", source)
        )
        model = validate_model_section(model_raw, source)
        sections = {"tokenizer": tokenizer, "target_tokenizer": target_tokenizer, "model": model}
        run = _validate(cls, {**raw, **sections}, (), source, {"check_files": check_files})
        try:
            _check_kind(run)
            model.check_run(run)
        except ValueError as err:
            raise ConfigError(f"{source}: {err}") from None
        return run

    @property
    def kind(self) -> str:
        """The model family's kind: "lm" or "seq2seq"."""
        from lmzoo.models import get_model_info

        return get_model_info(self.model.name).kind


FREE_WHEN_FINE_TUNING = {"dropout"}  # model keys a fine-tune may change; every other key must match


def _inherit_from_run(raw: dict, source: str, check_files: bool) -> dict:
    """Take model and tokenizer sections from the `init_from` run; a conflicting section is an error."""
    base_dir = Path(str(raw["init_from"]))
    if not (base_dir / "config.yaml").is_file():
        if not check_files:  # reloading a finished fine-tune whose base moved: keep its own sections
            return raw
        raise ConfigError(f"{source}: init_from: {base_dir} is not a run directory (no config.yaml)")
    base = read_yaml(base_dir / "config.yaml")
    if not isinstance(base, dict) or "model" not in base:
        raise ConfigError(f"{source}: init_from: {base_dir}/config.yaml is not an lmzoo run config")
    merged = dict(raw)
    model = dict(base["model"])
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
        # Key by key, as for the model: restating the base run's values (a copied base config) is no
        # conflict, while the saved section lists every key with its default.
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


def _check_kind(run: RunConfig) -> None:
    """A seq2seq model needs sentence pairs; a language model needs text."""
    paired = run.data.format in ("parallel", "tsv")
    if run.kind == "seq2seq" and not paired:
        raise ValueError(
            f"data.format: model {run.model.name!r} translates sentence pairs; set data.format to parallel or tsv"
        )
    if run.kind == "lm" and paired:
        raise ValueError(
            f"data.format: model {run.model.name!r} is a language model; use format text, instruct or preference"
        )
    if run.data.format == "preference" and not run.init_from:
        raise ValueError("data.format: preference tuning (DPO) needs init_from: the model it starts from is its reference")
    if run.target_tokenizer is not None and run.kind != "seq2seq":
        raise ValueError("target_tokenizer: only seq2seq models have a target side")
    if run.train.best_metric == "bleu" and (run.kind != "seq2seq" or not run.train.bleu_sentences):
        raise ValueError("train.best_metric: bleu needs a seq2seq model and train.bleu_sentences > 0")


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string"}.get(type(value), type(value).__name__)


def validate_model_section(raw: Any, source: str) -> ModelConfig:
    from lmzoo.models import MODEL_REGISTRY  # imports torch: only needed once a config is loaded

    configs = {name: info.config for name, info in MODEL_REGISTRY.items()}
    return _validate_tagged(raw, "model", "name", configs, None, source)  # type: ignore[return-value]


def _validate_tagged(
    raw: Any, section: str, tag: str, classes: dict[str, type[Section]], default: str | None, source: str
) -> Section:
    """Validate a section whose `tag` key (tokenizer.kind, model.name) picks its config class."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {section}: expected a mapping, got {_kind(raw)}")
    choice = raw.get(tag, default)
    if choice is None:
        misspelt = difflib.get_close_matches(tag, [str(k) for k in raw], n=1, cutoff=0.6)
        if misspelt:  # `nme: lstm`: name the key that is there, not only the one that is missing
            raise ConfigError(f"{source}: {section}.{misspelt[0]}: unknown key (did you mean {tag!r}?)")
        raise ConfigError(f"{source}: {section}.{tag}: missing; choose one of {', '.join(sorted(classes))}")
    if choice not in classes:
        hint = _did_you_mean(str(choice), classes)
        raise ConfigError(
            f"{source}: {section}.{tag}: unknown {tag} {choice!r}{hint}; known: {', '.join(sorted(classes))}"
        )
    return _validate(classes[choice], {**raw, tag: choice}, (section,), source)


def _validate(
    cls: type[BaseModel], raw: dict, prefix: tuple[str, ...], source: str, context: dict | None = None
) -> Any:
    try:
        return cls.model_validate(raw, context=context)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_describe(err, cls, prefix)}") from None


def _describe(err: ValidationError, cls: type[BaseModel], prefix: tuple[str, ...]) -> str:
    """One line for the first error of a pydantic ValidationError, naming the key path."""
    errors = err.errors(include_url=False)
    # An unknown key usually explains the rest (a misspelt d_model leaves the default in place), so it comes first.
    errors.sort(key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    loc = _key_path(cls, first["loc"])
    path = ".".join(prefix + loc) or "(top level)"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    if first["type"] == "extra_forbidden":
        known = _fields_at(cls, loc[:-1])
        hint = _did_you_mean(loc[-1], known) or (f"; known keys: {', '.join(known)}" if known else "")
        return f"{path}: unknown key{hint}{more}"
    if first["type"] == "missing":
        return f"{path}: missing required key{more}"
    message = first["msg"]
    message = message[0].lower() + message[1:]
    for noise in ("Value error, ", "value error, "):
        message = message.replace(noise, "")
    return f"{path}: {message}, got {first.get('input')!r}{more}"


def _key_path(cls: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, ...]:
    """The error location as config keys: drop the member tags pydantic adds inside a union (`str`, ...)."""
    parts: list[str] = []
    current: Any = cls
    skip_tag = False
    for part in loc:
        if skip_tag:
            skip_tag = False
            continue
        parts.append(str(part))
        fields = current.model_fields if isinstance(current, type) and issubclass(current, BaseModel) else {}
        field = fields.get(part) if isinstance(part, str) else None
        if field is None:
            current = None
            continue
        members = [a for a in typing.get_args(field.annotation) if a is not type(None)]
        current = _section_class(field.annotation)
        is_union = typing.get_origin(field.annotation) in (typing.Union, types.UnionType)
        skip_tag = current is None and is_union and len(members) > 1
    return tuple(parts)


def _fields_at(cls: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    """The field names of the (nested) section at `loc`, for "did you mean" hints."""
    current: Any = cls
    for part in loc:
        field = current.model_fields.get(part) if isinstance(current, type) else None
        if field is None:
            return []
        current = _section_class(field.annotation)
        if current is None:
            return []
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else []


def _section_class(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_class(arg)
        if found is not None:
            return found
    return None


def _did_you_mean(word: str, known: Any) -> str:
    match = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """Turn `train.lr=3e-4` style arguments into (key path, YAML-typed value) pairs."""
    parsed = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=3e-4)")
        try:
            typed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            typed = value
        parsed.append((key.split("."), typed))
    return parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each `a.b.c=value` override in the nested dict `raw` (a new dict is returned)."""
    import copy

    result = copy.deepcopy(raw)
    for keys, value in parse_overrides(overrides):
        node = result
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise ConfigError(f"override {'.'.join(keys)}: {where} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return result


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file; a missing file or a syntax error becomes one ConfigError line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply `key=value` overrides, validate, and fill the run name."""
    raw = read_yaml(path)
    if raw is None:
        raise ConfigError(f"{path}: the file is empty; a config needs at least a `model:` section")
    if isinstance(raw, dict) and overrides:
        raw = apply_overrides(raw, overrides)
    config = RunConfig.from_dict(raw, source=str(path))
    if config.name is None:
        config.name = Path(path).stem
    return config


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
