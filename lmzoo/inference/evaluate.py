"""Held-out evaluation: token loss and perplexity for every model, corpus BLEU for seq2seq models.

A text is scored by the one scorer (lmzoo.inference.scoring), so `lmzoo eval --data F` equals
`lmzoo score --file F`. Batches of examples (sentence pairs, SFT records) are scored teacher-forced,
each batch's mean weighted by its token count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from lmzoo.data.batch import to_device
from lmzoo.data.example_files import Pair
from lmzoo.data.examples import encode_pairs, pair_batches
from lmzoo.device import autocast
from lmzoo.errors import DataError
from lmzoo.inference.loaded import LoadedModel
from lmzoo.inference.scoring import evaluate_stream
from lmzoo.inference.seq2seq import translate_corpus
from lmzoo.models.base import PAD_ID, Seq2SeqModel, eval_mode


def evaluate_text(lm: LoadedModel, text: str) -> dict[str, float]:
    """Loss, perplexity and scored tokens of a language model on `text` (every token after the first)."""
    if not text.strip():
        raise DataError("the text to evaluate is empty")
    return evaluate_stream(lm, lm.tokenizer.encode(text))


def token_weighted_loss(
    model: torch.nn.Module,
    batches: Iterable,
    loss_of: Callable[[Any], tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    precision: str,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Mean NLL over every scored token of `batches` (each batch's mean weighted by its token count).

    `loss_of(batch)` returns (mean loss, targets) for a batch already on `device`; targets equal to
    PAD are not scored. Returns loss (nats), perplexity and the number of tokens.
    """
    total, count = 0.0, 0
    with torch.inference_mode(), eval_mode(model):
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            with autocast(device, precision):
                loss, targets = loss_of(to_device(batch, device))
            tokens = int((targets != PAD_ID).sum())
            total, count = total + float(loss) * tokens, count + tokens
    mean = total / max(count, 1)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": float(count)}


def evaluate_seq2seq(
    model: Seq2SeqModel,
    batches: Iterable,
    *,
    device: torch.device,
    precision: str = "fp32",
    max_batches: int | None = None,
) -> dict[str, float]:
    """Teacher-forced mean NLL (nats) and perplexity over target tokens (padding excluded)."""

    def loss_of(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        src, tgt_in, tgt_out = batch[:3]  # a PairBatch may also carry its token count
        src_mask = src == PAD_ID
        h, _ = model.decode_hidden(tgt_in, model.encode(src, src_mask), src_mask)
        return model.head.loss(h, tgt_out, ignore_index=PAD_ID), tgt_out

    return token_weighted_loss(
        model, batches, loss_of, device=device, precision=precision, max_batches=max_batches
    )


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu, its default 13a tokenization) of detokenized output against raw references."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def evaluate_pairs(lm: LoadedModel, pairs: list[Pair], *, beam: int = 5) -> dict[str, float]:
    """A seq2seq model on sentence pairs: teacher-forced loss and perplexity, and corpus BLEU of its
    greedy and its beam-search translations."""
    if not pairs:
        raise DataError("no sentence pairs to evaluate")
    source_tok, target_tok = lm.tokenizer, lm.output_tokenizer
    encoded = encode_pairs(pairs, source_tok, target_tok, max_len=lm.max_target_len)
    batches = pair_batches(
        encoded,
        lm.batch_size,
        seed=0,
        bos_id=target_tok.bos_id,
        eos_id=target_tok.eos_id,
        shuffle=False,
        name="evaluation",
    )
    metrics = evaluate_seq2seq(lm.seq2seq_model, batches, device=lm.device, precision=lm.precision)
    sources, references = [s for s, _ in pairs], [t for _, t in pairs]
    for label, width in (("greedy", 1), (f"beam{beam}", beam)):
        hyps = translate_corpus(
            lm.seq2seq_model,
            sources,
            source_tok,
            target_tok,
            max_len=lm.max_target_len,
            beam=width,
            device=lm.device,
        )
        metrics[f"bleu_{label}"] = corpus_bleu(hyps, references)
    metrics["sentences"] = float(len(pairs))
    return metrics
