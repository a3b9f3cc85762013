"""Looking inside a trained model: the probability it gives each token of a text, and of each token it
generates.

`score_text` follows `lmzoo eval` exactly (the same windows of the run's seq_len and evaluation batch
size, recurrent models carrying their state, the same precision), so `score(text).loss` equals
`evaluate(data=<file with text>)["loss"]`. The first token of each evaluation column is read as
context only (it has nothing to be predicted from); the tokens eval leaves over at the end of the
stream are not scored either. Seq2seq runs score the target (and its <eos>) given the source,
teacher-forced, as eval does.

Bits per character = -total log-probability / (characters x ln 2), where `characters` counts the
characters of the scored part of the text. It does not depend on how the text was cut into tokens,
so char, word and BPE models can be compared with it (perplexity per token cannot).

`generate_with_probs` streams a generation with, for each new token, its log-probability, the top-k
alternatives and the entropy of the step's distribution (the model's own distribution, before
temperature, top-k/top-p, repetition penalty and banned ids shape the sampling).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lmzoo.errors import ConfigError, DataError
from lmzoo.tokenizers import SPECIALS, Tokenizer


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
    that were read but not scored (the first token of each evaluation column)."""

    tokens: list[TokenScore]
    total_logprob: float
    loss: float  # mean nats per scored token
    ppl: float
    characters: int  # characters of the scored part of the text
    bits_per_char: float  # -total_logprob / (characters * ln 2)
    context: list[tuple[int, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepProbs:
    """One generated token: its text, id, log-probability, the top alternatives (text, id, logprob)
    and the entropy (nats) of the distribution it was drawn from."""

    token: str
    id: int
    logprob: float
    top: list[tuple[str, int, float]]
    entropy: float

    def to_openai(self) -> dict[str, Any]:
        """The record OpenAI's `logprobs.content` holds: token, logprob, bytes, top_logprobs."""

        def entry(text: str, logprob: float) -> dict[str, Any]:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {**entry(self.token, self.logprob), "top_logprobs": [entry(t, lp) for t, _, lp in self.top]}


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """The text of one token on its own; special tokens by name (<eos>, <unk>...)."""
    text = tokenizer.decode([token_id])
    if text and text != "\ufffd":
        return text
    return SPECIALS[token_id] if token_id < len(SPECIALS) else text


def token_pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's share of the decoded text ("" for a byte that only completes a character later)."""
    from lmzoo.generate import TextStream

    stream = TextStream(tokenizer)
    pieces = [stream.push(token) for token in ids]
    if pieces:
        pieces[-1] += stream.flush()
    return pieces


def _top_entries(
    logprobs: torch.Tensor, k: int, tokenizer: Tokenizer
) -> Iterator[list[tuple[str, int, float]]]:
    """For each row of logprobs (N, V): its k most likely (text, id, logprob), most likely first."""
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    for row_values, row_ids in zip(values.tolist(), ids.tolist(), strict=True):
        yield [(token_text(tokenizer, i), i, v) for i, v in zip(row_ids, row_values, strict=True)]


def _require_known(tokenizer: Tokenizer, ids: list[int], what: str) -> None:
    if ids and all(i == tokenizer.unk_id for i in ids):
        raise DataError(f"no token of the {what} is in the run's vocabulary ({tokenizer.kind} tokenizer)")


# ---- scoring a text ---------------------------------------------------------------------------


def score_text(
    run: Any,
    text: str,
    *,
    source: str | None = None,
    checkpoint_tag: str = "best",
    device: torch.device,
    top_k: int = 5,
) -> Scored:
    """Per-token log-probabilities of `text` under the run's model (seq2seq: of the target given `source`)."""
    if top_k < 0:
        raise ConfigError(f"--top-k must be >= 0, got {top_k}")
    if run.kind == "seq2seq" and source is None:
        raise ConfigError("a seq2seq run scores a target given its source: pass --source")
    if run.kind != "seq2seq" and source is not None:
        raise ConfigError("--source is for seq2seq runs; a language model scores the text alone")
    if not text:
        raise DataError("the text to score is empty")
    model = run.model(checkpoint_tag, device)
    if run.kind == "seq2seq":
        return _score_seq2seq(run, model, source or "", text, device, top_k)
    return _score_lm(run, model, text, device, top_k)


def _score_lm(run: Any, model: torch.nn.Module, text: str, device: torch.device, top_k: int) -> Scored:
    """Windows, batch columns and carried state exactly as lmzoo.evaluate.evaluate_lm reads them."""
    from lmzoo.data import eval_windows
    from lmzoo.device import autocast, pick_precision
    from lmzoo.evaluate import eval_mode

    tokenizer, cfg = run.tokenizer, run.config
    ids = tokenizer.encode(text)
    _require_known(tokenizer, ids, "text")
    if len(ids) < 2:
        raise DataError("the text has fewer than 2 tokens; the first one is only context, nothing is scored")
    stream, positions = torch.tensor(ids), torch.arange(len(ids))
    batch_size, seq_len = cfg.data.eval_batch_size or cfg.data.batch_size, cfg.seq_len
    precision = pick_precision(device, cfg.train.precision)
    found: dict[int, tuple[float, int, list[tuple[str, int, float]]]] = {}
    state = None
    with torch.inference_mode(), eval_mode(model):
        windows = zip(
            eval_windows(stream, batch_size, seq_len),
            eval_windows(positions, batch_size, seq_len),
            strict=True,
        )
        for (x, y), (_, where) in windows:
            with autocast(device, precision):
                h, state = model.hidden(x.to(device), state if model.carries_state else None)
                logits = model.head.logits(h)
            logprobs = logits.float().log_softmax(-1).flatten(0, 1).cpu()  # (B*T, V)
            targets, where = y.flatten(), where.flatten()
            chosen = logprobs.gather(1, targets[:, None]).squeeze(1)
            ranks = (logprobs > chosen[:, None]).sum(-1) + 1
            tops = _top_entries(logprobs, top_k, tokenizer)
            for pos, lp, rank, top in zip(where.tolist(), chosen.tolist(), ranks.tolist(), tops, strict=True):
                found[pos] = (lp, rank, top)
    pieces = token_pieces(tokenizer, ids)
    tokens = [
        TokenScore(pieces[pos], ids[pos], *found[pos], position=pos)
        for pos in range(len(ids))
        if pos in found
    ]
    context = [(pos, pieces[pos]) for pos in range(len(ids)) if pos not in found]
    characters = max(1, len(text) - sum(len(piece) for _, piece in context))
    return _summarise(tokens, characters, context)


def _score_seq2seq(
    run: Any, model: torch.nn.Module, source: str, target: str, device: torch.device, top_k: int
) -> Scored:
    """Teacher-forced, as lmzoo.evaluate.evaluate_seq2seq: targets are the target tokens and <eos>."""
    from lmzoo.device import autocast, pick_precision
    from lmzoo.evaluate import eval_mode
    from lmzoo.examples import collate_pairs
    from lmzoo.models.base import PAD_ID

    source_tok, target_tok, cfg = run.tokenizer, run.target_tokenizer, run.config
    src_ids, tgt_ids = source_tok.encode(source), target_tok.encode(target)
    _require_known(source_tok, src_ids, "source")
    _require_known(target_tok, tgt_ids, "text")
    src_ids = src_ids + [source_tok.eos_id]
    limit = cfg.data.max_len
    if len(src_ids) > limit or len(tgt_ids) + 1 > limit:
        raise DataError(
            f"the source or target is longer than the run's data.max_len ({limit} tokens with <eos>); "
            "lmzoo eval skips such pairs"
        )
    batch = collate_pairs([(src_ids, tgt_ids)], bos_id=target_tok.bos_id, eos_id=target_tok.eos_id)
    src, tgt_in = batch.source.to(device), batch.target_in.to(device)
    src_mask = src == PAD_ID
    with torch.inference_mode(), eval_mode(model):
        with autocast(device, pick_precision(device, cfg.train.precision)):
            h, _ = model.decode_hidden(tgt_in, model.encode(src, src_mask), src_mask)
            logits = model.head.logits(h)
    logprobs = logits[0].float().log_softmax(-1).cpu()  # (T+1, V)
    targets = batch.target_out[0]
    chosen = logprobs.gather(1, targets[:, None]).squeeze(1)
    ranks = (logprobs > chosen[:, None]).sum(-1) + 1
    pieces = token_pieces(target_tok, tgt_ids) + [SPECIALS[target_tok.eos_id]]
    rows = zip(
        pieces,
        targets.tolist(),
        chosen.tolist(),
        ranks.tolist(),
        _top_entries(logprobs, top_k, target_tok),
        strict=True,
    )
    tokens = [
        TokenScore(piece, token, lp, rank, top, position=pos)
        for pos, (piece, token, lp, rank, top) in enumerate(rows)
    ]
    return _summarise(tokens, max(1, len(target)), [])


def _summarise(tokens: list[TokenScore], characters: int, context: list[tuple[int, str]]) -> Scored:
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


# ---- probabilities of generated tokens --------------------------------------------------------


def step_probs(logits: torch.Tensor, token: int, tokenizer: Tokenizer, top_k: int) -> StepProbs:
    """The record of one generation step from the model's raw scores (V,) and the token chosen."""
    logprobs = logits.float().log_softmax(-1)
    entropy = float(torch.special.entr(logprobs.exp()).sum())
    top = next(_top_entries(logprobs[None].cpu(), top_k, tokenizer)) if top_k else []
    return StepProbs(token_text(tokenizer, token), token, float(logprobs[token]), top, entropy)


def generate_with_probs(
    run: Any,
    prompt: str,
    *,
    top_logprobs: int = 5,
    checkpoint_tag: str = "best",
    device: str = "auto",
    seed: int | None = None,
    warn: Callable[[str], None] | None = None,
    **sampling: Any,
) -> Iterator[tuple[str, StepProbs]]:
    """Like Run.generate, one (text piece, StepProbs) per generated token, with the `top_logprobs`
    most likely alternatives (`sampling` holds Run.sampling's options, top_k included). A piece may
    be "" for a byte that completes a character only with the next token. Stop strings end the stream."""
    from lmzoo.device import pick_device
    from lmzoo.generate import TextStream, encode_prompt, generate_ids
    from lmzoo.translate import decode_stream, encode_source

    options = run.sampling(**sampling)
    model = run.model(checkpoint_tag, pick_device(device))
    generator = None
    if seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    tokenizer = run.target_tokenizer or run.tokenizer
    steps: list[StepProbs] = []

    def observe(logits: torch.Tensor, token: int) -> None:
        steps.append(step_probs(logits, token, tokenizer, top_logprobs))

    banned = (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id)
    if run.kind == "seq2seq":
        limit = min(run.config.data.max_len, options.max_new_tokens or run.config.data.max_len)
        src = encode_source(model, run.tokenizer, prompt, warn)
        ids = decode_stream(
            model,
            src,
            bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id,
            max_len=limit,
            options=options,
            generator=generator,
            banned_ids=banned,
            observe=observe,
        )
        stream = TextStream(tokenizer)
    else:
        prompt_ids = encode_prompt(tokenizer, prompt, warn)
        ids = generate_ids(
            model, prompt_ids, options, generator=generator, banned_ids=banned, observe=observe
        )
        stream = TextStream(tokenizer, context=prompt_ids)
    yield from _cut_at_stop(((stream.push(token), steps.pop()) for token in ids), stream, options.stop)


def _cut_at_stop(
    steps: Iterator[tuple[str, StepProbs]], stream: Any, stops: Sequence[str]
) -> Iterator[tuple[str, StepProbs]]:
    """Hold one step back so the stream's tail joins the last piece; end where a stop string starts."""
    text, emitted, held = "", 0, None
    for piece, step in steps:
        text += piece
        hits = [text.find(stop) for stop in stops if stop and stop in text]
        cut = min(hits) if hits else None
        if held is not None:
            if cut is not None and cut < emitted + len(held[0]):
                if cut > emitted:
                    yield held[0][: cut - emitted], held[1]
                return
            yield held
            emitted += len(held[0])
        if cut is not None:
            if cut > emitted:
                yield piece[: cut - emitted], step
            return
        held = (piece, step)
    if held is not None:
        yield held[0] + stream.flush(), held[1]
