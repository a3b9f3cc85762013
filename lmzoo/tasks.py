"""What a run trains on, per kind of model: data, tokenizers, batches, objective, evaluation, samples.

The training loop (lmzoo.train) sees only a `Task`; it never asks which family or data format it
is training. `build_task` reads and tokenizes the data (every data problem surfaces here, before
any model is built), then builds the model and the matching batches and objective.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmzoo.config import RunConfig
from lmzoo.data import (
    PairBatches,
    encode_pairs,
    encode_stream,
    make_batches,
    read_pair_splits,
    read_splits,
)
from lmzoo.device import autocast
from lmzoo.evaluate import corpus_bleu, evaluate_lm, evaluate_seq2seq, translate_corpus
from lmzoo.generate import SamplingOptions, generate
from lmzoo.models import build_model
from lmzoo.objectives import LMObjective, Seq2SeqObjective
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
    config: RunConfig, device: torch.device, precision: str, tokenizers: dict[str, Tokenizer] | None = None
) -> Task:
    """The task for `config`; `tokenizers` (from a run directory) are reused instead of fitted."""
    if config.kind == "seq2seq":
        return _seq2seq_task(config, device, precision, tokenizers)
    return _lm_task(config, device, precision, tokenizers)


def _sample_options(config: RunConfig) -> SamplingOptions:
    sample = config.sample
    return SamplingOptions(max_new_tokens=min(sample.max_new_tokens, 200), temperature=sample.temperature,
                           top_k=sample.top_k, top_p=sample.top_p, repetition_penalty=sample.repetition_penalty)


def _in_eval_mode(model: torch.nn.Module, device: torch.device, precision: str, make: Callable[[], str]) -> str:
    was_training = model.training
    model.eval()
    try:
        with autocast(device, precision):
            return make()
    finally:
        model.train(was_training)


def _lm_task(config: RunConfig, device, precision, tokenizers) -> Task:
    splits = read_splits(config.data)
    if tokenizers is None:
        fit_text = splits.train if config.tokenizer.fit_on == "train" else splits.train + splits.val + splits.test
        tokenizer = fit_tokenizer(config.tokenizer, fit_text)
    else:
        tokenizer = tokenizers["tokenizer.json"]
    train_stream = encode_stream(tokenizer, splits.train)
    val_stream = encode_stream(tokenizer, splits.val)
    seq_len = config.data.seq_len = config.seq_len
    model = build_model(config.model, tokenizer.vocab_size).to(device)
    sequential = config.data.sampling == "sequential" or (config.data.sampling == "auto" and model.carries_state)
    batches = make_batches(train_stream, config.data, seq_len, sequential=sequential, seed=config.seed)
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
                objective=LMObjective(carry=model.carries_state and sequential), tokens_per_epoch=len(train_stream),
                evaluate=evaluate, sample=sample)


def _seq2seq_task(config: RunConfig, device, precision, tokenizers) -> Task:
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
    model = build_model(config.model, (source_tok.vocab_size, target_tok.vocab_size)).to(device)
    ids = {"bos_id": target_tok.bos_id, "eos_id": target_tok.eos_id}
    batches = PairBatches(train_pairs, config.data.batch_size, seed=config.seed, **ids)
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
