"""The one scorer: the log-probability a model gives every token of a text, read by one rule.

Every token after the first is scored once, given the tokens before it:

* A model that carries its state (RNN, LSTM, GRU) reads a sequence in chunks of `window` tokens,
  carrying the state from chunk to chunk, so every token sees everything before it. A long text is
  cut into columns of COLUMN_WINDOWS windows (each column's first token is read as context) that
  are read side by side.
* A model with a context window (GPT, modern) reads windows of `window` tokens that follow one another
  and overlap by one token: a window's first input is the previous window's last target. This is the
  rolling-window rule of evaluation harnesses (lm-evaluation-harness's loglikelihood_rolling), and the
  distribution of contexts the model trained on.

The windows or columns of many sequences are batched `batch_size` at a time; a batch changes only
how fast the numbers come, not which numbers. `lmzoo score`, `lmzoo eval`, echo logprobs of the
HTTP API, kNN-LM datastores and their evaluation, and RAG chunk losses all read text through here.

Bits per character = -total log-probability / (characters x ln 2), where `characters` counts the
characters of the scored part of the text; it does not depend on how the text was cut into tokens, so
char, word and BPE models can be compared with it (perplexity per token cannot).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lmzoo.data.tokenizer import SPECIALS, Tokenizer
from lmzoo.device import autocast
from lmzoo.errors import ConfigError, DataError
from lmzoo.inference.loaded import LoadedModel
from lmzoo.inference.text import token_pieces, token_text
from lmzoo.models.base import PAD_ID, eval_mode

COLUMN_WINDOWS = 64  # a state-carrying model reads long texts in columns of this many windows

TokenIds = Sequence[int] | torch.Tensor


@dataclass
class HiddenBatch:
    """The scored positions of one forward pass, flattened: which sequence (n,), the position of the
    target in it (n,; >= 1), the target ids (n,) and the features the output head reads there (n, C)."""

    sequence: torch.Tensor
    position: torch.Tensor
    target: torch.Tensor
    hidden: torch.Tensor


def _as_tensor(ids: TokenIds) -> torch.Tensor:
    return ids if isinstance(ids, torch.Tensor) else torch.tensor(list(ids), dtype=torch.long)


def read_sequences(lm: LoadedModel, sequences: Sequence[TokenIds]) -> Iterator[HiddenBatch]:
    """Run the model over every sequence by the module's rule; one HiddenBatch per forward pass.

    Call it inside torch.inference_mode (and autocast) as the caller needs; it changes no mode itself.
    """
    streams = [_as_tensor(ids) for ids in sequences]
    window = lm.window if lm.context_len is None else min(lm.window, lm.context_len)
    model = lm.language_model
    carried = model.carries_state
    span = window * COLUMN_WINDOWS if carried else window
    device = lm.device
    segments = _segments(streams, span)  # lazily: a long (memory-mapped) stream is read window by window
    while group := list(itertools.islice(segments, lm.batch_size)):
        width = max(length for _, _, length in group)
        inputs = torch.full((len(group), width), PAD_ID, dtype=torch.long)
        targets = torch.full((len(group), width), PAD_ID, dtype=torch.long)
        positions = torch.arange(width).repeat(len(group), 1)
        valid = positions < torch.tensor([length for _, _, length in group])[:, None]  # (B, width)
        for row, (index, start, length) in enumerate(group):
            inputs[row, :length] = streams[index][start : start + length]
            targets[row, :length] = streams[index][start + 1 : start + 1 + length]
            positions[row] += start + 1
        rows = torch.tensor([index for index, _, _ in group])[:, None].expand(-1, width)
        state = None
        for chunk in range(0, width, window):  # one pass for windows; chunk by chunk for columns
            part = slice(chunk, chunk + window)
            h, state = model.hidden(inputs[:, part].to(device), state if carried else None)  # (B, T, C)
            keep = valid[:, part]
            yield HiddenBatch(
                sequence=rows[:, part][keep],
                position=positions[:, part][keep],
                target=targets[:, part][keep].to(device),
                hidden=h[keep.to(device)],
            )


def _segments(streams: list[torch.Tensor], span: int) -> Iterator[tuple[int, int, int]]:
    """(sequence, first input position, input length) of each window, or column of a state-carrying model."""
    for index, stream in enumerate(streams):
        for start in range(0, len(stream) - 1, span):
            yield index, start, min(span, len(stream) - 1 - start)


@dataclass
class SequenceScores:
    """Per target position 1..n-1 of one sequence: log-probability, rank among all tokens (1 = the
    most likely) and the `k` most likely tokens (ids and log-probabilities, most likely first)."""

    ids: list[int]
    logprobs: torch.Tensor  # (n - 1,) float64
    ranks: torch.Tensor  # (n - 1,) long
    top_ids: torch.Tensor  # (n - 1, k)
    top_logprobs: torch.Tensor  # (n - 1, k)


def score_sequences(
    lm: LoadedModel, sequences: Sequence[TokenIds], *, top_k: int = 0
) -> list[SequenceScores]:
    """Every token after the first of each sequence scored by the module's rule."""
    streams = [_as_tensor(ids) for ids in sequences]
    sizes = [max(0, len(stream) - 1) for stream in streams]
    k = max(0, top_k)
    logprobs = [torch.zeros(size, dtype=torch.float64) for size in sizes]
    ranks = [torch.zeros(size, dtype=torch.long) for size in sizes]
    top_ids = [torch.zeros(size, k, dtype=torch.long) for size in sizes]
    top_values = [torch.zeros(size, k) for size in sizes]
    with torch.inference_mode(), eval_mode(lm.model), autocast(lm.device, lm.precision):
        for batch in read_sequences(lm, streams):
            rows = lm.model.head.logits(batch.hidden).float().log_softmax(-1)  # (n, V)
            chosen = rows.gather(1, batch.target[:, None])  # (n, 1)
            rank = (rows > chosen).sum(-1) + 1
            values, ids = rows.topk(min(k, rows.shape[-1]), dim=-1) if k else (None, None)
            for index in batch.sequence.unique().tolist():
                mine = batch.sequence == index
                where = batch.position[mine] - 1
                logprobs[index][where] = chosen[mine.to(chosen.device), 0].double().cpu()
                ranks[index][where] = rank[mine.to(rank.device)].cpu()
                if values is not None and ids is not None:
                    top_ids[index][where] = ids[mine.to(ids.device)].cpu()
                    top_values[index][where] = values[mine.to(values.device)].cpu()
    return [
        SequenceScores(stream.tolist(), lp, rk, ti, tv)
        for stream, lp, rk, ti, tv in zip(streams, logprobs, ranks, top_ids, top_values, strict=True)
    ]


def evaluate_stream(lm: LoadedModel, stream: TokenIds, *, max_tokens: int | None = None) -> dict[str, float]:
    """Mean NLL (nats per token), perplexity and the number of scored tokens of one long token stream
    (at most its first `max_tokens` + 1 tokens), by the module's rule, without keeping per-token lists."""
    ids = _as_tensor(stream)
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    if len(ids) < 2:
        raise DataError("the evaluation text has fewer than 2 tokens")
    total, count = 0.0, 0
    with torch.inference_mode(), eval_mode(lm.model), autocast(lm.device, lm.precision):
        for batch in read_sequences(lm, [ids]):
            rows = lm.model.head.logits(batch.hidden).float().log_softmax(-1)
            total -= float(rows.gather(1, batch.target[:, None]).double().sum())
            count += len(batch.target)
    mean = total / max(count, 1)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": float(count)}


# ---- a text, token by token -------------------------------------------------------------------


@dataclass
class TokenScore:
    """One scored token: its text, id, log-probability (nats), rank among all tokens (1 = the most
    likely) and the top alternatives (text, id, logprob), most likely first."""

    text: str
    id: int
    logprob: float
    rank: int
    top: list[tuple[str, int, float]]
    position: int = 0  # index of the token in the text's token sequence


@dataclass
class Scored:
    """Per-token scores of a text and their totals; `context` holds (position, text) of the tokens
    read but not scored (a language model's first token: nothing comes before it)."""

    tokens: list[TokenScore]
    total_logprob: float
    loss: float  # mean nats per scored token
    ppl: float
    characters: int  # characters of the scored part of the text
    bits_per_char: float  # -total_logprob / (characters * ln 2)
    context: list[tuple[int, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _require_known(tokenizer: Tokenizer, ids: list[int], what: str) -> None:
    if ids and all(i == tokenizer.unk_id for i in ids):
        raise DataError(f"no token of the {what} is in the run's vocabulary ({tokenizer.kind} tokenizer)")


def _tops(scores: SequenceScores, row: int, tokenizer: Tokenizer) -> list[tuple[str, int, float]]:
    ids, values = scores.top_ids[row].tolist(), scores.top_logprobs[row].tolist()
    return [(token_text(tokenizer, i), i, v) for i, v in zip(ids, values, strict=True)]


def score_text(lm: LoadedModel, text: str, *, top_k: int = 5) -> Scored:
    """Per-token log-probabilities of `text` under a language model; equals `lmzoo eval` on the text."""
    if not text:
        raise DataError("the text to score is empty")
    return score_ids(lm, lm.tokenizer.encode(text), characters=len(text), top_k=top_k)


def score_ids(lm: LoadedModel, token_ids: TokenIds, *, characters: int, top_k: int = 5) -> Scored:
    """`score_text` of a text given as its token ids (a prepared file's) and its length in characters."""
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0, got {top_k}", param="top_k")
    tokenizer = lm.tokenizer
    ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
    _require_known(tokenizer, ids, "text")
    if len(ids) < 2:
        raise DataError("the text has fewer than 2 tokens; the first one is only context, nothing is scored")
    [scores] = score_sequences(lm, [ids], top_k=top_k)
    pieces = token_pieces(tokenizer, ids)
    tokens = [
        TokenScore(pieces[pos], ids[pos], float(scores.logprobs[pos - 1]), int(scores.ranks[pos - 1]),
                   _tops(scores, pos - 1, tokenizer), position=pos)
        for pos in range(1, len(ids))
    ]  # fmt: skip
    return summarise(tokens, max(1, characters - len(pieces[0])), [(0, pieces[0])])


def score_target(lm: LoadedModel, source: str, target: str, *, top_k: int = 5) -> Scored:
    """Seq2seq models: each target token (and <eos>) given the source and the target before it, as
    teacher-forced evaluation reads them."""
    from lmzoo.data.examples import collate_pairs

    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0, got {top_k}", param="top_k")
    if not target:
        raise DataError("the text to score is empty")
    source_tok, target_tok = lm.tokenizer, lm.output_tokenizer
    src_ids, tgt_ids = source_tok.encode(source), target_tok.encode(target)
    _require_known(source_tok, src_ids, "source")
    _require_known(target_tok, tgt_ids, "text")
    src_ids = src_ids + [source_tok.eos_id]
    limit = lm.max_target_len
    if len(src_ids) > limit or len(tgt_ids) + 1 > limit:
        raise DataError(
            f"the source or target is longer than the run's data.max_len ({limit} tokens with <eos>); "
            "lmzoo eval skips such pairs"
        )
    batch = collate_pairs([(src_ids, tgt_ids)], bos_id=target_tok.bos_id, eos_id=target_tok.eos_id)
    src, tgt_in = batch.source.to(lm.device), batch.target_in.to(lm.device)
    src_mask = src == PAD_ID
    model = lm.seq2seq_model
    with torch.inference_mode(), eval_mode(model), autocast(lm.device, lm.precision):
        h, _ = model.decode_hidden(tgt_in, model.encode(src, src_mask), src_mask)
        logprobs = model.head.logits(h)[0].float().log_softmax(-1).cpu()  # (T+1, V)
    targets = batch.target_out[0]
    chosen = logprobs.gather(1, targets[:, None]).squeeze(1)
    ranks = (logprobs > chosen[:, None]).sum(-1) + 1
    values, top = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
    pieces = token_pieces(target_tok, tgt_ids) + [SPECIALS[target_tok.eos_id]]
    tokens = []
    for pos, (piece, token) in enumerate(zip(pieces, targets.tolist(), strict=True)):
        alternatives = [
            (token_text(target_tok, i), i, v)
            for i, v in zip(top[pos].tolist(), values[pos].tolist(), strict=True)
        ]
        tokens.append(
            TokenScore(piece, token, float(chosen[pos]), int(ranks[pos]), alternatives, position=pos)
        )
    return summarise(tokens, max(1, len(target)), [])


def summarise(tokens: list[TokenScore], characters: int, context: list[tuple[int, str]]) -> Scored:
    total = sum(t.logprob for t in tokens)
    loss = -total / len(tokens)
    return Scored(
        tokens=tokens,
        total_logprob=total,
        loss=loss,
        ppl=math.exp(min(loss, 50.0)),
        characters=characters,
        bits_per_char=-total / (characters * math.log(2)),
        context=context,
    )
