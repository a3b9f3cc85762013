"""The run schema: typed, validated sections of a run config. Pure: no registry, no torch.

Every section rejects unknown keys and type-checks its values. The `model:` and `tokenizer:`
sections are validated against the config class their family registered (lmzoo.run.config
picks it by `name` / `kind`); a model config class learns its `kind` when it is registered.
"""

from __future__ import annotations

import glob
import os
import string
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationInfo, field_validator

BUNDLED_PREFIX = "lmzoo:"

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def resolve_data_path(path: str) -> Path:
    """Map `lmzoo:name` to the corpus shipped inside the package; other paths are used as given."""
    if path.startswith(BUNDLED_PREFIX):
        return Path(__file__).parent.parent / "corpora" / path[len(BUNDLED_PREFIX) :]
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
    # text: files, globs and folders (searched recursively) of .txt/.md, .jsonl, their .gz forms, .parquet
    train: str | list[str] = "lmzoo:tinyshakespeare.txt"
    val: str | None = (
        None  # a separate validation file, folder or glob (or prefix); by default split off `train`
    )
    test: str | None = None
    split: tuple[Probability, Probability, Probability] = (0.9, 0.05, 0.05)  # train/val/test fractions
    # text: how `split` carves train: lines, documents (files, JSONL records), or tokens (the last fractions of
    # the token stream); auto: lines for text files named one by one, documents for folders, globs, JSONL
    split_by: Literal["auto", "lines", "documents", "tokens"] = "auto"
    text_field: str = "text"  # JSONL, parquet and saved datasets: the field that holds each document's text
    # text: what separates two documents in the token stream: <eos>, any other text, or "" (nothing)
    document_end: str = "<eos>"
    cache_dir: str | None = (
        None  # prepared token files (lmzoo prepare); None: $LMZOO_CACHE_DIR or ~/.cache/lmzoo
    )
    workers: PositiveInt | None = None  # processes that tokenize a corpus being prepared; None: one per core
    max_len: PositiveInt = 100  # seq2seq: training pairs with a longer source or target are skipped
    # instruct: the prompt built from each {instruction, input, output} record; the loss covers only `output`
    template: str = "### Instruction:\n{instruction}\n{input}\n### Response:\n"
    # instruct and preference records: keep only those whose `task` field is one of these (None: all)
    tasks: list[str] | None = None
    # preference records: keep only those whose `kind` field is one of these (None: all), e.g. [style]
    kinds: list[str] | None = None
    # instruct records: each training record of a task named here is seen this many times per epoch (the
    # others once), e.g. {add: 4, subtract: 4} to spend more of the steps on tasks that are learned slowly
    task_weights: dict[str, PositiveInt] | None = None
    seq_len: PositiveInt | None = None  # None: the model's context length, or 128 for recurrent models
    batch_size: PositiveInt = 32
    eval_batch_size: PositiveInt | None = None  # None: same as batch_size
    # seq2seq: training batches by token count instead of batch_size rows: pairs of similar length
    # together, at most this many padded source + target tokens per batch (per process), as in fairseq
    max_tokens: PositiveInt | None = None
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
            _existing_input(path, info)
        return value

    @field_validator("val", "test")
    @classmethod
    def _split_file_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            _existing_input(value, info)
        return value

    @field_validator("template")
    @classmethod
    def _template_fields(cls, value: str) -> str:
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

    @property
    def eval_rows(self) -> int:
        """Sequences (windows) per evaluation batch: eval_batch_size, else batch_size."""
        return self.eval_batch_size or self.batch_size


def _existing_input(path: str, info: ValidationInfo) -> None:
    """A text corpus entry is a file, a folder or a glob that matches something; other data is files."""
    if info.data.get("format", "text") != "text":
        for file in _files_of(path, info.data):
            _existing_file(file, info)
        return
    if not (info.context or {}).get("check_files", True):
        return
    if any(c in path for c in "*?[") and not path.startswith(BUNDLED_PREFIX):
        if not glob.glob(os.path.expanduser(path), recursive=True):
            raise ValueError(f"no file matches {path}")
    elif not resolve_data_path(path).exists():
        raise ValueError(f"file not found: {resolve_data_path(path)}")


def _files_of(path: str, data: dict[str, Any]) -> list[str]:
    if data.get("format") == "parallel":
        return [f"{path}.{data.get('source', 'src')}", f"{path}.{data.get('target', 'tgt')}"]
    return [path]


class TokenizerConfig(Section):
    """Base of every tokenizer's config class; `kind` picks the registered tokenizer."""

    kind: str
    fit_on: Literal["train", "all"] = "train"  # which text builds the vocabulary
    # text corpora: the most text (characters) word and BPE vocabularies are fitted on: all of it when the
    # split is smaller, else evenly spaced blocks; a char vocabulary always sees every character
    fit_bytes: PositiveInt = 100_000_000


class ModelConfig(Section):
    """Base of every model's config class; `name` picks the registered model."""

    kind: ClassVar[str] = "lm"  # "lm" or "seq2seq": set by register_model from the model class
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
    # noam: inverse square root with linear warmup to `lr` at warmup_steps (min_lr unused); lmzoo.training.optim.lr_at
    schedule: Literal["cosine", "linear", "constant", "noam"] = "cosine"
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
    # also save `last` once this many minutes have passed since the last save (requeued/preempted jobs)
    checkpoint_every_minutes: Annotated[float, Field(gt=0)] | None = None
    patience: PositiveInt | None = None  # early stopping: evals without improvement
    best_metric: Literal["loss", "bleu"] = "loss"  # what picks checkpoints/best (bleu: seq2seq only)
    bleu_sentences: NonNegInt = 200  # seq2seq: validation sentences translated for BLEU at each eval
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps
    nan_policy: Literal["stop", "skip"] = "stop"
    dpo_beta: Annotated[float, Field(gt=0)] = 0.1  # DPO: strength of the pull towards the reference model
    # DPO: weight of the chosen responses' negative log-likelihood per token added to the loss (RPO); 0: none
    dpo_nll: Annotated[float, Field(ge=0)] = 0.0
    # what the run optimises. auto: by data.format (text: language modelling, parallel/tsv: translation,
    # instruct: SFT, preference: DPO); reward: a reward model on preference pairs (a scalar head on the
    # hidden state plus the response's log-likelihood, Bradley-Terry loss); ppo / grpo: reinforcement
    # learning on instruct prompts (section rl)
    objective: Literal["auto", "reward", "ppo", "grpo"] = "auto"
    # reward: add a learned multiple of the response's log-likelihood (under the model's own output layer)
    # to the head's score; false: the head alone
    reward_likelihood: bool = True
    # torch.compile the model's forward and backward (falls back to eager with a warning); a mode name picks
    # torch.compile's mode: reduce-overhead adds CUDA graphs, max-autotune-no-cudagraphs tunes matmuls
    compile: bool | CompileMode = False
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
    """How to fine-tune the model loaded with `init_from`: all weights, LoRA, or adapters (lmzoo.models.peft)."""

    method: Literal["full", "lora", "adapter"] = "full"
    r: PositiveInt = 8  # LoRA rank
    alpha: Annotated[float, Field(gt=0)] = 16.0  # LoRA scale is alpha / r
    dropout: Probability = 0.0  # LoRA rank dropout
    # LoRA: parameter-name patterns (fnmatch) of the weights to adapt; None: the model's default targets
    targets: list[str] | None = None
    bottleneck: PositiveInt = 16  # adapter width
    # adapters: name patterns (fnmatch) of the model's adapter sites to use; None: every site it offers
    sites: list[str] | None = None


class RLConfig(Section):
    """Reinforcement learning (train.objective ppo or grpo): rollouts from the policy, their rewards, and the
    KL divergence that keeps the policy near the init_from model it starts from (the reference)."""

    # model: the score of the reward model in reward_run; exact_match: 1 when the response equals the
    # record's output (ignoring one final full stop), else 0, a verifiable reward; style: 1 when the
    # response ends with a full stop, else 0
    reward: str = "model"
    reward_run: str | None = None  # reward model: a run trained with train.objective reward
    prompts_per_rollout: PositiveInt = 16  # training prompts drawn for each rollout
    samples_per_prompt: PositiveInt = 1  # responses sampled per prompt; GRPO's group size (at least 2)
    epochs: PositiveInt = 2  # passes over each rollout, in minibatches of data.batch_size responses
    max_new_tokens: PositiveInt = 16  # longest response, in tokens
    temperature: Annotated[float, Field(gt=0)] = 1.0  # sampling temperature of the rollouts
    top_k: PositiveInt | None = None  # rollouts sample among the k most likely tokens (None: all)
    clip: Annotated[float, Field(gt=0, lt=1)] = 0.2  # the probability ratio is clipped to 1 +- clip
    # beta: PPO subtracts beta * (log pi - log pi_ref) from each token's reward; GRPO adds beta * KL to the loss
    kl_coef: Annotated[float, Field(ge=0)] = 0.05
    # PPO: adapt beta so the KL per response approaches this (nats; Ziegler et al., 2019); None: beta fixed
    target_kl: Annotated[float, Field(gt=0)] | None = None
    kl_horizon: PositiveInt = 10000  # PPO adaptive KL: responses over which beta moves by up to 20%
    value_coef: Annotated[float, Field(ge=0)] = 0.1  # PPO: weight of the value head's loss
    value_clip: Annotated[float, Field(gt=0)] = 0.2  # PPO: new values stay within this of the rollout's
    gamma: Probability = 1.0  # PPO: discount per token
    lam: Probability = 0.95  # PPO: GAE lambda
    entropy_coef: Annotated[float, Field(ge=0)] = 0.0  # weight of an entropy bonus (0: none)
    eval_prompts: PositiveInt = (
        200  # validation prompts answered at each evaluation (exact match, reward, KL)
    )


class SampleConfig(Section):
    """Defaults for sampling: used by `lmzoo generate` and for the text logged at each eval."""

    prompt: str = ""
    max_new_tokens: PositiveInt = 200
    temperature: Annotated[float, Field(ge=0)] = 0.8
    top_k: PositiveInt | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0
    greedy: bool = False  # always take the most likely token (as temperature 0)
    stop: list[str] = []  # stop when one of these texts appears
    ignore_eos: bool = False  # go on after <eos> up to max_new_tokens (benchmarks; seq2seq: data.max_len)


class RunConfig(Section):
    """A whole run: what `lmzoo train` executes and writes to `runs/<name>/config.yaml`."""

    name: str | None = None  # default: the config file's stem
    out_dir: str = "runs"
    seed: int = 1337
    data: DataConfig = DataConfig()
    tokenizer: SerializeAsAny[TokenizerConfig]
    # seq2seq only: a separate target-side tokenizer; None shares `tokenizer` between both sides
    target_tokenizer: SerializeAsAny[TokenizerConfig] | None = None
    model: SerializeAsAny[ModelConfig]
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    init_from: str | None = None  # a run directory: start from its weights, model config and tokenizer
    finetune: FinetuneConfig | None = None  # with init_from: full (default), lora or adapter
    rl: RLConfig = RLConfig()  # train.objective ppo / grpo: rollouts, rewards, KL

    @property
    def seq_len(self) -> int:
        """Training sequence length after defaults: data.seq_len, else the model's context, else 128."""
        return self.data.seq_len or self.model.context_len or 128

    @property
    def eval_tokens(self) -> int | None:
        """Tokens of a validation text an evaluation during training scores: train.eval_batches batches of
        data.eval_rows windows of seq_len tokens (None: all of it)."""
        batches = self.train.eval_batches
        return None if batches is None else batches * self.data.eval_rows * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @property
    def kind(self) -> str:
        """The model family's kind: "lm" or "seq2seq"."""
        return self.model.kind

    def check(self) -> None:
        """Checks across sections (raise ValueError): a seq2seq model needs sentence pairs, and so on."""
        paired = self.data.format in ("parallel", "tsv")
        name = self.model.name
        self._check_objective()
        if self.kind == "seq2seq" and not paired:
            raise ValueError(
                f"data.format: model {name!r} translates sentence pairs; set data.format to parallel or tsv"
            )
        if self.kind == "lm" and paired:
            raise ValueError(
                f"data.format: model {name!r} is a language model; use format text, instruct or preference"
            )
        if self.data.format == "preference" and not self.init_from and self.train.objective != "reward":
            raise ValueError(
                "data.format: preference tuning (DPO) needs init_from: the model it starts from is its reference"
            )
        if self.finetune is not None and not self.init_from:
            raise ValueError("finetune: needs init_from (the run whose model is fine-tuned)")
        if self.data.max_tokens is not None and not paired:
            raise ValueError(
                "data.max_tokens: batches by token count are for sentence pairs (parallel or tsv)"
            )
        if self.data.max_tokens is not None and self.data.max_tokens < 2 * self.data.max_len:
            raise ValueError(
                f"data.max_tokens: {self.data.max_tokens} is less than the longest pair may need "
                f"(2 x data.max_len = {2 * self.data.max_len} padded tokens)"
            )
        if self.target_tokenizer is not None and self.kind != "seq2seq":
            raise ValueError("target_tokenizer: only seq2seq models have a target side")
        if self.train.best_metric == "bleu" and (self.kind != "seq2seq" or not self.train.bleu_sentences):
            raise ValueError("train.best_metric: bleu needs a seq2seq model and train.bleu_sentences > 0")
        self.model.check_run(self)

    def _check_objective(self) -> None:
        objective = self.train.objective
        if objective == "auto":
            return
        if self.kind == "seq2seq":
            raise ValueError(
                f"train.objective: {objective} scores a language model's responses; model "
                f"{self.model.name!r} is a seq2seq model"
            )
        wanted = "preference" if objective == "reward" else "instruct"
        if self.data.format != wanted:
            raise ValueError(f"data.format: train.objective {objective} reads {wanted} records")
        if objective in ("ppo", "grpo"):
            if not self.init_from:
                raise ValueError(f"init_from: {objective} starts from a trained policy (its reference model)")
            if objective == "grpo" and self.rl.samples_per_prompt < 2:
                raise ValueError("rl.samples_per_prompt: GRPO compares a group of responses; use 2 or more")
            if self.rl.reward == "model" and not self.rl.reward_run:
                raise ValueError("rl.reward_run: rl.reward model needs the reward model's run directory")
