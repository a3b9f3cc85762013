"""Held-out evaluation: token loss and perplexity for every model, corpus BLEU for seq2seq models."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from lmzoo.data import eval_windows
from lmzoo.device import autocast
from lmzoo.models.base import PAD_ID
from lmzoo.objectives import to_device


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off for the duration; the model's previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


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


def evaluate_lm(
    model: torch.nn.Module,
    stream: torch.Tensor,
    *,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    device: torch.device,
    precision: str = "fp32",
) -> dict[str, float]:
    """Token-weighted mean NLL (nats) and perplexity over the stream, read in order.

    Recurrent models carry their state from one window to the next, as in training, so every
    token after the first window is predicted with the full left context.
    """
    carried: list[Any] = [None]

    def loss_of(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        h, carried[0] = model.hidden(x, carried[0] if model.carries_state else None)
        return model.head.loss(h, y, ignore_index=PAD_ID), y

    windows = eval_windows(stream, batch_size, seq_len, max_batches)
    return token_weighted_loss(model, windows, loss_of, device=device, precision=precision)


def evaluate_seq2seq(
    model: torch.nn.Module,
    batches,
    *,
    device: torch.device,
    precision: str = "fp32",
    max_batches: int | None = None,
) -> dict[str, float]:
    """Teacher-forced mean NLL (nats) and perplexity over target tokens (padding excluded)."""

    def loss_of(batch) -> tuple[torch.Tensor, torch.Tensor]:
        src, tgt_in, tgt_out = batch[:3]  # a PairBatch may also carry its token count
        src_mask = src == PAD_ID
        h, _ = model.decode_hidden(tgt_in, model.encode(src, src_mask), src_mask)
        return model.head.loss(h, tgt_out, ignore_index=PAD_ID), tgt_out

    return token_weighted_loss(
        model, batches, loss_of, device=device, precision=precision, max_batches=max_batches
    )


def translate_corpus(
    model: torch.nn.Module,
    sources: list[str],
    source_tokenizer,
    target_tokenizer,
    *,
    max_len: int,
    beam: int = 1,
    length_penalty: float = 1.0,
    batch_size: int = 64,
    device: torch.device,
) -> list[str]:
    """Translate sentences in length-sorted batches (greedy for beam 1, else beam search), in input order."""
    from lmzoo.examples import collate_pairs
    from lmzoo.translate import beam_search, decode_batch

    tgt = target_tokenizer
    banned = (tgt.pad_id, tgt.unk_id, tgt.bos_id)
    encoded = [source_tokenizer.encode(s)[: max_len - 1] + [source_tokenizer.eos_id] for s in sources]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(sources)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            src = collate_pairs(
                [(encoded[i], []) for i in chunk], bos_id=tgt.bos_id, eos_id=tgt.eos_id
            ).source
            src = src.to(device)
            if beam == 1:
                ids = decode_batch(
                    model, src, bos_id=tgt.bos_id, eos_id=tgt.eos_id, max_len=max_len, banned_ids=banned
                )
            else:
                hyps = beam_search(
                    model,
                    src,
                    beam=beam,
                    bos_id=tgt.bos_id,
                    eos_id=tgt.eos_id,
                    max_len=max_len,
                    length_penalty=length_penalty,
                    banned_ids=banned,
                )
                ids = [h[0].tokens for h in hyps]
            for i, tokens in zip(chunk, ids, strict=True):
                outputs[i] = tgt.decode(tokens)
    return outputs


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu, its default 13a tokenization) of detokenized output against raw references."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def evaluate_run(
    run: Any,
    *,
    data: str | Path | None = None,
    split: str = "val",
    beam: int = 5,
    checkpoint_tag: str = "best",
    device: torch.device,
) -> dict[str, float]:
    """Score a trained `Run` on a text file (or pairs), or on its own validation/test split.

    Language models: loss and perplexity. Seq2seq models: loss, perplexity and corpus BLEU with
    greedy decoding and with beam search (`beam`).
    """
    from lmzoo.data import encode_stream, read_splits, read_text_file
    from lmzoo.device import pick_precision
    from lmzoo.errors import ConfigError

    if split not in ("val", "test"):
        raise ConfigError(f"--split must be val or test, got {split!r}")
    model = run.model(checkpoint_tag, device)
    if run.kind == "seq2seq":
        return _evaluate_seq2seq_run(run, model, data=data, split=split, device=device, beam=beam)
    text = read_text_file(data) if data is not None else getattr(read_splits(run.config.data), split)
    if not text.strip():
        raise ConfigError(f"the run's {split} split is empty; pass --data FILE")
    cfg = run.config
    return evaluate_lm(
        model,
        encode_stream(run.tokenizer, text),
        batch_size=cfg.data.eval_batch_size or cfg.data.batch_size,
        seq_len=cfg.seq_len,
        device=device,
        precision=pick_precision(device, cfg.train.precision),
    )


def _evaluate_seq2seq_run(
    run: Any, model: torch.nn.Module, *, data: str | Path | None, split: str, device: torch.device, beam: int
) -> dict[str, float]:
    from lmzoo.device import pick_precision
    from lmzoo.errors import ConfigError
    from lmzoo.examples import encode_pairs, pair_batches, read_pair_file, read_pair_splits

    cfg = run.config
    pairs = (
        read_pair_file(cfg.data, str(data))
        if data is not None
        else getattr(read_pair_splits(cfg.data), split)
    )
    if not pairs:
        raise ConfigError(f"the run's {split} split has no sentence pairs; pass --data")
    source_tok, target_tok = run.tokenizer, run.target_tokenizer
    encoded = encode_pairs(pairs, source_tok, target_tok, max_len=cfg.data.max_len)
    batches = pair_batches(
        encoded,
        cfg.data.eval_batch_size or cfg.data.batch_size,
        seed=0,
        bos_id=target_tok.bos_id,
        eos_id=target_tok.eos_id,
        shuffle=False,
        name=split,
    )
    metrics = evaluate_seq2seq(
        model, batches, device=device, precision=pick_precision(device, cfg.train.precision)
    )
    sources, references = [s for s, _ in pairs], [t for _, t in pairs]
    for label, width in (("greedy", 1), (f"beam{beam}", beam)):
        hyps = translate_corpus(
            model, sources, source_tok, target_tok, max_len=cfg.data.max_len, beam=width, device=device
        )
        metrics[f"bleu_{label}"] = corpus_bleu(hyps, references)
    metrics["sentences"] = float(len(pairs))
    return metrics
