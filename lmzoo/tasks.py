"""What a run trains on, per kind of model: data, tokenizers, batches, objective, evaluation, samples.

The training loop (lmzoo.train) sees only a `Task`; it never asks which family or data format it
is training. `build_task` reads and tokenizes the data (every data problem surfaces here, before
any model is built), then builds the model and the matching batches and objective.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmzoo.checkpoint import initial_model
from lmzoo.config import RunConfig, read_yaml, resolve_data_path
from lmzoo.data import (
    PairBatches,
    ShuffledBatches,
    encode_pairs,
    encode_stream,
    make_batches,
    preference_batch,
    prompt_response_ids,
    read_pair_splits,
    read_records,
    read_splits,
    sft_batch,
)
from lmzoo.device import autocast
from lmzoo.errors import DataError
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
from lmzoo.objectives import LMObjective, Seq2SeqObjective, to_device
from lmzoo.tokenizers import Tokenizer, fit_tokenizer


@dataclass
class Task:
    tokenizer: Tokenizer  # the source side for seq2seq
    target_tokenizer: Tokenizer | None  # seq2seq only (the same object when shared)
    model: torch.nn.Module
    batches: Any  # .next() -> batch, .state_dict(), len() = batches per epoch
    objective: Any
    tokens_per_epoch: int
    evaluate: Callable[[], dict[str, float]]  # "loss", "ppl", and "bleu" for seq2seq
    sample: Callable[[int], str]  # a short text for TensorBoard at a step

    def tokenizers(self) -> dict[str, Tokenizer]:
        """The files a run directory keeps: tokenizer.json, and target_tokenizer.json when separate."""
        files = {"tokenizer.json": self.tokenizer}
        if self.target_tokenizer is not None and self.target_tokenizer is not self.tokenizer:
            files["target_tokenizer.json"] = self.target_tokenizer
        return files


def build_task(
    config: RunConfig, device: torch.device, precision: str, tokenizers: dict[str, Tokenizer] | None = None,
    batch_scale: int = 1,
) -> Task:
    """The task for `config`; `tokenizers` (from a run directory) are reused instead of fitted.

    Training batches hold data.batch_size x `batch_scale` rows: the global batch that the ranks
    of a distributed run share out (lmzoo.distributed.ShardedBatches).
    """
    batch = config.data.batch_size * batch_scale
    if config.kind == "seq2seq":
        return _seq2seq_task(config, device, precision, tokenizers, batch)
    if config.data.format == "instruct":
        return _sft_task(config, device, precision, tokenizers, batch)
    if config.data.format == "preference":
        return _dpo_task(config, device, precision, tokenizers, batch)
    return _lm_task(config, device, precision, tokenizers, batch)


def _sample_options(config: RunConfig) -> SamplingOptions:
    sample = config.sample
    return SamplingOptions(max_new_tokens=min(sample.max_new_tokens, 200), temperature=sample.temperature,
                           top_k=sample.top_k, top_p=sample.top_p, repetition_penalty=sample.repetition_penalty)


def _in_eval_mode(model: torch.nn.Module, device: torch.device, precision: str, make: Callable[[], str]) -> str:
    with eval_mode(model), autocast(device, precision):
        return make()


def _lm_task(config: RunConfig, device, precision, tokenizers, batch: int) -> Task:
    splits = read_splits(config.data)
    if tokenizers is None:
        fit_text = splits.train if config.tokenizer.fit_on == "train" else splits.train + splits.val + splits.test
        tokenizer = fit_tokenizer(config.tokenizer, fit_text)
    else:
        tokenizer = tokenizers["tokenizer.json"]
    train_stream = encode_stream(tokenizer, splits.train)
    val_stream = encode_stream(tokenizer, splits.val)
    seq_len = config.data.seq_len = config.seq_len
    carries_state = get_model_info(config.model.name).cls.carries_state
    sequential = config.data.sampling == "sequential" or (config.data.sampling == "auto" and carries_state)
    # Batches before the model: a corpus too short for one batch fails before anything is built.
    batches = make_batches(train_stream, batch, seq_len, sequential=sequential, seed=config.seed)
    model = initial_model(config, tokenizer.vocab_size, device)
    options = _sample_options(config)

    def evaluate() -> dict[str, float]:
        return evaluate_lm(model, val_stream, batch_size=config.data.eval_batch_size or config.data.batch_size,
                           seq_len=seq_len, max_batches=config.train.eval_batches, device=device, precision=precision)

    def sample(step: int) -> str:
        """Sampled from its own generator, so training randomness is untouched."""
        generator = torch.Generator(device=device).manual_seed(config.seed + step)
        prompt = config.sample.prompt
        return prompt + _in_eval_mode(
            model, device, precision, lambda: "".join(generate(model, tokenizer, prompt, options, generator=generator))
        )

    return Task(tokenizer=tokenizer, target_tokenizer=None, model=model, batches=batches,
                objective=LMObjective(carry=carries_state and sequential), tokens_per_epoch=len(train_stream),
                evaluate=evaluate, sample=sample)


def _seq2seq_task(config: RunConfig, device, precision, tokenizers, batch: int) -> Task:
    pairs = read_pair_splits(config.data)
    if tokenizers is not None:
        source_tok = tokenizers["tokenizer.json"]
        target_tok = tokenizers.get("target_tokenizer.json", source_tok)
    else:
        fit_pairs = pairs.train if config.tokenizer.fit_on == "train" else pairs.train + pairs.val + pairs.test
        sources = "\n".join(s for s, _ in fit_pairs)
        targets = "\n".join(t for _, t in fit_pairs)
        if config.target_tokenizer is None:
            source_tok = target_tok = fit_tokenizer(config.tokenizer, sources + "\n" + targets)
        else:
            source_tok = fit_tokenizer(config.tokenizer, sources)
            target_tok = fit_tokenizer(config.target_tokenizer, targets)
    max_len = config.data.max_len
    train_pairs = encode_pairs(pairs.train, source_tok, target_tok, max_len=max_len)
    val_pairs = encode_pairs(pairs.val, source_tok, target_tok, max_len=max_len)
    model = initial_model(config, (source_tok.vocab_size, target_tok.vocab_size), device)
    ids = {"bos_id": target_tok.bos_id, "eos_id": target_tok.eos_id}
    batches = PairBatches(train_pairs, batch, seed=config.seed, **ids)
    val_batches = PairBatches(val_pairs, config.data.eval_batch_size or config.data.batch_size, seed=0,
                              shuffle=False, name="validation", **ids)
    bleu_pairs = pairs.val[: config.train.bleu_sentences]

    def evaluate() -> dict[str, float]:
        metrics = evaluate_seq2seq(model, val_batches, device=device, precision=precision,
                                   max_batches=config.train.eval_batches)
        if bleu_pairs:
            hyps = _in_eval_mode(model, device, precision, lambda: translate_corpus(
                model, [s for s, _ in bleu_pairs], source_tok, target_tok, max_len=max_len, device=device))
            metrics["bleu"] = corpus_bleu(hyps, [t for _, t in bleu_pairs])
        return metrics

    def sample(step: int) -> str:
        from lmzoo.translate import translate

        source, reference = pairs.val[0]
        [(hyp, _)] = _in_eval_mode(model, device, precision, lambda: [
            translate(model, source_tok, target_tok, source, max_len=max_len)[0]])
        return f"{source}\n-> {hyp}\n(reference: {reference})"

    tokens = sum(len(t) + 1 for _, t in train_pairs)
    return Task(tokenizer=source_tok, target_tokenizer=target_tok, model=model, batches=batches,
                objective=Seq2SeqObjective(), tokens_per_epoch=tokens, evaluate=evaluate, sample=sample)


def _record_splits(config: RunConfig, fields: tuple[str, ...]) -> dict[str, list[dict[str, str]]]:
    """Records of the train file; the validation records come from data.val or are split off train."""
    from lmzoo.data import _carve

    records = read_records(config.data.train_files[0], fields)
    given = {"val": bool(config.data.val), "test": bool(config.data.test)}
    parts = _carve(records, config.data.split, given)
    if config.data.val:
        parts["val"] = read_records(config.data.val, fields)
    if not parts.get("val"):
        raise DataError("no validation records: give data.val or raise the validation fraction in data.split")
    return parts


def _require_tokenizer(config: RunConfig, tokenizers, text: str) -> Tokenizer:
    if tokenizers is not None:
        return tokenizers["tokenizer.json"]
    return fit_tokenizer(config.tokenizer, text)


def _sft_task(config: RunConfig, device, precision, tokenizers, batch: int) -> Task:
    """Instruction tuning: the loss covers only the response tokens of each templated record."""
    fields = ("instruction", "input", "output")
    parts = _record_splits(config, fields)
    prompts = {name: [(config.data.template.format(instruction=r["instruction"], input=r["input"]), r["output"])
                      for r in records] for name, records in parts.items()}
    tokenizer = _require_tokenizer(config, tokenizers, "\n".join(p + r for p, r in prompts["train"]))
    model = initial_model(config, tokenizer.vocab_size, device)
    context = model.context_len
    encode = {name: [prompt_response_ids(tokenizer, p, r, context) for p, r in pairs] for name, pairs in prompts.items()}
    batches = ShuffledBatches(encode["train"], batch, seed=config.seed, collate=sft_batch)
    val = ShuffledBatches(encode["val"], config.data.eval_batch_size or config.data.batch_size, seed=0,
                          collate=sft_batch, shuffle=False)
    options = _sample_options(config)
    first_prompt = prompts["val"][0][0]

    def sample(step: int) -> str:
        generator = torch.Generator(device=device).manual_seed(config.seed + step)
        stop_options = SamplingOptions(**{**options.__dict__, "stop": ("\n\n",)})
        return first_prompt + _in_eval_mode(model, device, precision, lambda: "".join(
            generate(model, tokenizer, first_prompt, stop_options, generator=generator)))

    return Task(tokenizer=tokenizer, target_tokenizer=None, model=model, batches=batches,
                objective=LMObjective(carry=False), tokens_per_epoch=sum(len(t) for _, t in encode["train"]),
                evaluate=lambda: token_weighted_loss(model, val, lambda b: (model(b.inputs, targets=b.targets)[0], b.targets),
                                                     device=device, precision=precision),
                sample=sample)


def _dpo_task(config: RunConfig, device, precision, tokenizers, batch: int) -> Task:
    """Preference tuning with DPO against the frozen init_from model."""
    from lmzoo.objectives import DPOObjective, preference_metrics, sequence_logprobs
    from lmzoo.peft import adapters_disabled, has_adapters

    parts = _record_splits(config, ("prompt", "chosen", "rejected"))
    tokenizer = _require_tokenizer(config, tokenizers, "")
    model = initial_model(config, tokenizer.vocab_size, device)
    context = model.context_len

    def encode(records):
        return [(prompt_response_ids(tokenizer, r["prompt"], r["chosen"], context),
                 prompt_response_ids(tokenizer, r["prompt"], r["rejected"], context)) for r in records]

    train, val_pairs = encode(parts["train"]), encode(parts["val"])
    batches = ShuffledBatches(train, batch, seed=config.seed, collate=preference_batch)
    val = ShuffledBatches(val_pairs, config.data.eval_batch_size or config.data.batch_size, seed=0,
                          collate=preference_batch, shuffle=False)
    if has_adapters(model):
        def frozen(inputs, targets):  # the same weights with LoRA/adapters off: no second copy
            with adapters_disabled(model), eval_mode(model):
                return sequence_logprobs(model, inputs, targets)
    else:
        reference_model = copy.deepcopy(model).eval().requires_grad_(False)

        def frozen(inputs, targets):
            return sequence_logprobs(reference_model, inputs, targets)
    beta = config.train.dpo_beta
    objective = DPOObjective(beta, frozen)
    base = RunConfig.from_dict(read_yaml(Path(config.init_from) / "config.yaml"), check_files=False)
    pretrain_val = None  # the base run's own validation text, to watch what DPO costs the language model
    if base.data.format == "text" and all(resolve_data_path(f).is_file() for f in base.data.train_files):
        pretrain_val = encode_stream(tokenizer, read_splits(base.data).val)

    def evaluate() -> dict[str, float]:
        chosen, rejected, losses = [], [], []
        with torch.inference_mode(), eval_mode(model):
            for batch in val:
                batch = to_device(batch, device)
                with autocast(device, precision):
                    loss, _ = objective(model, batch)
                rewards = objective.last_rewards
                chosen.append(rewards[0])
                rejected.append(rewards[1])
                losses.append(float(loss) * len(rewards[0]))
        chosen_all, rejected_all = torch.cat(chosen), torch.cat(rejected)
        metrics = {"loss": sum(losses) / len(chosen_all), **preference_metrics(chosen_all, rejected_all)}
        metrics["ppl"] = math.exp(min(metrics["loss"], 50.0))
        if pretrain_val is not None:
            lm = evaluate_lm(model, pretrain_val, batch_size=config.data.eval_batch_size or config.data.batch_size,
                             seq_len=base.seq_len, max_batches=config.train.eval_batches, device=device,
                             precision=precision)
            metrics["pretrain_loss"] = lm["loss"]
        return metrics

    first = parts["val"][0]["prompt"]
    options = _sample_options(config)

    def sample(step: int) -> str:
        generator = torch.Generator(device=device).manual_seed(config.seed + step)
        return first + _in_eval_mode(model, device, precision, lambda: "".join(
            generate(model, tokenizer, first, options, generator=generator)))

    return Task(tokenizer=tokenizer, target_tokenizer=None, model=model, batches=batches, objective=objective,
                tokens_per_epoch=sum(len(c[1]) + len(r[1]) for c, r in train), evaluate=evaluate, sample=sample)
