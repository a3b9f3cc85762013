"""What a run trains on, per kind of data: tokenizers, batches, objective, evaluation, samples.

The training loop (lmzoo.train) sees only a `Task`; it never asks which family or data format it
is training. `build_task` reads and tokenizes the data and builds the batch sources first (every
data problem surfaces there, before any model is built), then asks the run for its model.
Evaluation returns `Metrics`, which name the value that picks `checkpoints/best` and its direction.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from lmzoo.config.schema import RunConfig, resolve_data_path
from lmzoo.data import (
    ShuffledBatches,
    encode_pairs,
    encode_stream,
    make_batches,
    pair_batches,
    preference_batch,
    prompt_response_ids,
    read_pair_splits,
    read_record_splits,
    read_splits,
    sft_batch,
)
from lmzoo.device import autocast
from lmzoo.evaluate import (
    corpus_bleu,
    eval_mode,
    evaluate_lm,
    evaluate_seq2seq,
    token_weighted_loss,
    translate_corpus,
)
from lmzoo.generate import SamplingOptions, generate
from lmzoo.models import get_model_info
from lmzoo.objectives import (
    DPOObjective,
    LMObjective,
    Seq2SeqObjective,
    preference_metrics,
    sequence_logprobs,
    to_device,
)
from lmzoo.peft import adapters_disabled, has_adapters
from lmzoo.tokenizers import Tokenizer, fit_tokenizer


class BatchSource(Protocol):
    """Training batches: `next()` forever (epochs wrap), a position to save and restore, batches per epoch."""

    def next(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def __len__(self) -> int: ...


class Objective(Protocol):
    """batch -> (loss, target tokens); state that flows between batches is saved with the run."""

    def __call__(self, forward: Any, batch: Any) -> tuple[torch.Tensor, int]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Metrics:
    """Validation values, and which of them picks the best checkpoint, in which direction."""

    values: dict[str, float]
    key: str = "loss"
    higher_is_better: bool = False

    @property
    def score(self) -> float:
        return self.values[self.key]

    def improves_on(self, best: float | None) -> bool:
        if best is None or math.isnan(best):
            return True
        return self.score > best if self.higher_is_better else self.score < best


class ModelFactory(Protocol):
    def __call__(self, vocab_size: int | tuple[int, int]) -> torch.nn.Module: ...


@dataclass
class Task:
    tokenizer: Tokenizer  # the source side for seq2seq
    target_tokenizer: Tokenizer | None  # seq2seq only (the same object when shared)
    model: torch.nn.Module
    batches: BatchSource
    objective: Objective
    tokens_per_epoch: int
    evaluate: Callable[[], Metrics]
    sample: Callable[[int], str]  # a short text for TensorBoard at a step


@dataclass
class TaskContext:
    """What every task builder needs: the config, where to run, how to get the model and tokenizers."""

    config: RunConfig
    device: torch.device
    precision: str
    make_model: ModelFactory  # the run's starting model for a vocabulary size (lmzoo.run.Run.initial_model)
    tokenizers: dict[str, Tokenizer] | None  # reused from a run directory instead of fitted
    batch_size: int  # per-step rows: data.batch_size x the number of processes sharing them
    base_config: RunConfig | None = None  # fine-tunes: the init_from run's config

    @property
    def eval_batch_size(self) -> int:
        return self.config.data.eval_batch_size or self.config.data.batch_size

    def tokenizer(self, text: Callable[[], str], section: Any = None) -> Tokenizer:
        """The saved tokenizer, or one fitted on `text()` (read only when fitting)."""
        if self.tokenizers is not None:
            return self.tokenizers["tokenizer.json"]
        return fit_tokenizer(section or self.config.tokenizer, text())

    def in_eval_mode(self, model: torch.nn.Module, make: Callable[[], Any]) -> Any:
        with eval_mode(model), autocast(self.device, self.precision):
            return make()

    def sampler(
        self, model: torch.nn.Module, tokenizer: Tokenizer, prompt: str, **extra: Any
    ) -> Callable[[int], str]:
        """A short sample for TensorBoard, from its own generator so training randomness is untouched."""
        sample = self.config.sample
        options = SamplingOptions(
            max_new_tokens=min(sample.max_new_tokens, 200),
            temperature=sample.temperature,
            top_k=sample.top_k,
            top_p=sample.top_p,
            repetition_penalty=sample.repetition_penalty,
            **extra,
        )

        def make(step: int) -> str:
            generator = torch.Generator(device=self.device).manual_seed(self.config.seed + step)
            return prompt + self.in_eval_mode(
                model, lambda: "".join(generate(model, tokenizer, prompt, options, generator=generator))
            )

        return make


def build_task(context: TaskContext) -> Task:
    """The task for the run's config: language modelling, seq2seq, SFT or DPO."""
    config = context.config
    if config.kind == "seq2seq":
        return _seq2seq_task(context)
    builders = {"instruct": _sft_task, "preference": _dpo_task}
    return builders.get(config.data.format, _lm_task)(context)


def _lm_task(context: TaskContext) -> Task:
    config = context.config
    splits = read_splits(config.data)
    fit_text = splits.train if config.tokenizer.fit_on == "train" else splits.train + splits.val + splits.test
    tokenizer = context.tokenizer(lambda: fit_text)
    train_stream, val_stream = encode_stream(tokenizer, splits.train), encode_stream(tokenizer, splits.val)
    seq_len = config.data.seq_len = config.seq_len
    # Batches before the model: a corpus too short for one batch fails before anything is built.
    carries_state = _carries_state(config)
    sequential = config.data.sampling == "sequential" or (config.data.sampling == "auto" and carries_state)
    # The stream moves to the device once and batches are gathered there.
    batches = make_batches(
        train_stream,
        context.batch_size,
        seq_len,
        sequential=sequential,
        seed=config.seed,
        device=context.device,
    )
    model = context.make_model(tokenizer.vocab_size)

    def evaluate() -> Metrics:
        return Metrics(
            evaluate_lm(
                model,
                val_stream,
                batch_size=context.eval_batch_size,
                seq_len=seq_len,
                max_batches=config.train.eval_batches,
                device=context.device,
                precision=context.precision,
            )
        )

    objective = LMObjective(carry=carries_state and sequential, label_smoothing=config.train.label_smoothing)
    return Task(
        tokenizer=tokenizer,
        target_tokenizer=None,
        model=model,
        batches=batches,
        objective=objective,
        tokens_per_epoch=len(train_stream),
        evaluate=evaluate,
        sample=context.sampler(model, tokenizer, config.sample.prompt),
    )


def _carries_state(config: RunConfig) -> bool:
    return bool(get_model_info(config.model.name).cls.carries_state)


def _seq2seq_task(context: TaskContext) -> Task:
    config = context.config
    pairs = read_pair_splits(config.data)
    source_tok, target_tok = _pair_tokenizers(
        context, pairs.train + pairs.val + pairs.test if config.tokenizer.fit_on == "all" else pairs.train
    )
    max_len = config.data.max_len
    ids = {"bos_id": target_tok.bos_id, "eos_id": target_tok.eos_id}
    train_pairs = encode_pairs(pairs.train, source_tok, target_tok, max_len=max_len)
    batches = _pair_training_batches(context, train_pairs, ids)  # fails before the model is built
    val_batches = pair_batches(
        encode_pairs(pairs.val, source_tok, target_tok, max_len=max_len),
        context.eval_batch_size,
        seed=0,
        shuffle=False,
        name="validation",
        **ids,
    )
    model = context.make_model((source_tok.vocab_size, target_tok.vocab_size))
    bleu_pairs = pairs.val[: config.train.bleu_sentences]

    def evaluate() -> Metrics:
        values = evaluate_seq2seq(
            model,
            val_batches,
            device=context.device,
            precision=context.precision,
            max_batches=config.train.eval_batches,
        )
        if bleu_pairs:
            hyps = context.in_eval_mode(
                model,
                lambda: translate_corpus(
                    model,
                    [s for s, _ in bleu_pairs],
                    source_tok,
                    target_tok,
                    max_len=max_len,
                    device=context.device,
                ),
            )
            values["bleu"] = corpus_bleu(hyps, [t for _, t in bleu_pairs])
        by_bleu = config.train.best_metric == "bleu"
        return Metrics(values, key="bleu" if by_bleu else "loss", higher_is_better=by_bleu)

    def sample(step: int) -> str:
        from lmzoo.translate import translate

        source, reference = pairs.val[0]
        [(hyp, _)] = context.in_eval_mode(
            model, lambda: [translate(model, source_tok, target_tok, source, max_len=max_len)[0]]
        )
        return f"{source}\n-> {hyp}\n(reference: {reference})"

    tokens = sum(len(t) + 1 for _, t in train_pairs)
    return Task(
        tokenizer=source_tok,
        target_tokenizer=target_tok,
        model=model,
        batches=batches,
        objective=Seq2SeqObjective(label_smoothing=config.train.label_smoothing),
        tokens_per_epoch=tokens,
        evaluate=evaluate,
        sample=sample,
    )


def _pair_training_batches(context: TaskContext, pairs: list, ids: dict[str, int]) -> BatchSource:
    """Training pairs by token count (data.max_tokens: collated once, kept on the device) or by rows."""
    config = context.config
    if config.data.max_tokens is None:
        return pair_batches(pairs, context.batch_size, seed=config.seed, **ids)
    from lmzoo.token_batches import TokenBatches

    return TokenBatches(pairs, config.data.max_tokens, seed=config.seed, device=context.device, **ids)


def _pair_tokenizers(context: TaskContext, fit_pairs: list[tuple[str, str]]) -> tuple[Tokenizer, Tokenizer]:
    """(source, target) tokenizers: saved ones, one shared tokenizer, or one per side."""
    if context.tokenizers is not None:
        source = context.tokenizers["tokenizer.json"]
        return source, context.tokenizers.get("target_tokenizer.json", source)
    sources, targets = "\n".join(s for s, _ in fit_pairs), "\n".join(t for _, t in fit_pairs)
    config = context.config
    if config.target_tokenizer is None:
        shared = fit_tokenizer(config.tokenizer, sources + "\n" + targets)
        return shared, shared
    return fit_tokenizer(config.tokenizer, sources), fit_tokenizer(config.target_tokenizer, targets)


def _sft_task(context: TaskContext) -> Task:
    """Instruction tuning: the loss covers only the response tokens of each templated record."""
    config = context.config
    parts = read_record_splits(config.data, ("instruction", "input", "output"))
    prompts = {
        name: [
            (config.data.template.format(instruction=r["instruction"], input=r["input"]), r["output"])
            for r in records
        ]
        for name, records in parts.items()
    }
    tokenizer = context.tokenizer(lambda: "\n".join(p + r for p, r in prompts["train"]))
    context_len = config.model.context_len
    encoded = {
        name: [prompt_response_ids(tokenizer, p, r, context_len) for p, r in pairs]
        for name, pairs in prompts.items()
    }
    batches = ShuffledBatches(encoded["train"], context.batch_size, seed=config.seed, collate=sft_batch)
    val = ShuffledBatches(encoded["val"], context.eval_batch_size, seed=0, collate=sft_batch, shuffle=False)
    model = context.make_model(tokenizer.vocab_size)

    def evaluate() -> Metrics:
        return Metrics(
            token_weighted_loss(
                model,
                val,
                lambda b: (model(b.inputs, targets=b.targets)[0], b.targets),
                device=context.device,
                precision=context.precision,
            )
        )

    return Task(
        tokenizer=tokenizer,
        target_tokenizer=None,
        model=model,
        batches=batches,
        objective=LMObjective(carry=False, label_smoothing=config.train.label_smoothing),
        tokens_per_epoch=sum(len(t) for _, t in encoded["train"]),
        evaluate=evaluate,
        sample=context.sampler(model, tokenizer, prompts["val"][0][0], stop=("\n\n",)),
    )


def _dpo_task(context: TaskContext) -> Task:
    """Preference tuning with DPO against the frozen init_from model.

    Metrics: the DPO loss (which picks `best`), reward accuracy and margins, and, when the base
    run's validation text is still on disk, the language-model loss on it (what DPO costs).
    """
    config = context.config
    parts = read_record_splits(config.data, ("prompt", "chosen", "rejected"))
    tokenizer = context.tokenizer(lambda: "")
    context_len = config.model.context_len

    def encode(
        records: list[dict[str, str]],
    ) -> list[tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]]:
        return [
            (
                prompt_response_ids(tokenizer, r["prompt"], r["chosen"], context_len),
                prompt_response_ids(tokenizer, r["prompt"], r["rejected"], context_len),
            )
            for r in records
        ]

    train = encode(parts["train"])
    batches = ShuffledBatches(train, context.batch_size, seed=config.seed, collate=preference_batch)
    val = ShuffledBatches(
        encode(parts["val"]), context.eval_batch_size, seed=0, collate=preference_batch, shuffle=False
    )
    model = context.make_model(tokenizer.vocab_size)
    objective = DPOObjective(config.train.dpo_beta, _reference(model))
    pretrain_val = _base_validation_stream(context, tokenizer)

    def evaluate() -> Metrics:
        values = _dpo_validation(model, objective, val, context)
        if pretrain_val is not None:
            base = context.base_config
            lm = evaluate_lm(
                model,
                pretrain_val,
                batch_size=context.eval_batch_size,
                seq_len=base.seq_len,
                max_batches=config.train.eval_batches,
                device=context.device,
                precision=context.precision,
            )
            values["pretrain_loss"] = lm["loss"]
        return Metrics(values)

    return Task(
        tokenizer=tokenizer,
        target_tokenizer=None,
        model=model,
        batches=batches,
        objective=objective,
        tokens_per_epoch=sum(len(c[1]) + len(r[1]) for c, r in train),
        evaluate=evaluate,
        sample=context.sampler(model, tokenizer, parts["val"][0]["prompt"]),
    )


def _reference(model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """DPO's frozen reference: the same weights with LoRA/adapters off (no second copy), else a frozen copy."""
    if has_adapters(model):

        def frozen(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            with adapters_disabled(model), eval_mode(model):
                return sequence_logprobs(model, inputs, targets)

        return frozen
    reference_model = copy.deepcopy(model).eval().requires_grad_(False)
    return lambda inputs, targets: sequence_logprobs(reference_model, inputs, targets)


def _base_validation_stream(context: TaskContext, tokenizer: Tokenizer) -> torch.Tensor | None:
    """The base run's own validation text, to watch what DPO costs the language model (if still on disk)."""
    base = context.base_config
    if base is None or base.data.format != "text":
        return None
    if not all(resolve_data_path(f).is_file() for f in base.data.train_files):
        return None
    return encode_stream(tokenizer, read_splits(base.data).val)


def _dpo_validation(
    model: torch.nn.Module, objective: DPOObjective, val: ShuffledBatches, context: TaskContext
) -> dict[str, float]:
    chosen, rejected, losses = [], [], []
    with torch.inference_mode(), eval_mode(model):
        for batch in val:
            with autocast(context.device, context.precision):
                loss, _ = objective(model, to_device(batch, context.device))
            rewards = objective.last_rewards
            assert rewards is not None
            chosen.append(rewards[0])
            rejected.append(rewards[1])
            losses.append(float(loss) * len(rewards[0]))
    chosen_all, rejected_all = torch.cat(chosen), torch.cat(rejected)
    return {"loss": sum(losses) / len(chosen_all), **preference_metrics(chosen_all, rejected_all)}
