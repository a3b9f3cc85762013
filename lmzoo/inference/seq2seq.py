"""Decoding for seq2seq models: batched greedy/sampled decoding and beam search, written once against the
contract `encode(src, src_mask) -> memory`, `decode(tgt, memory, src_mask, state) -> (logits, state)`.
(Streaming one translation goes through lmzoo.inference.decoding, the loop every output shares.)

Each step feeds only the newest target token with the decoding state (the RNN hidden state, or the
Transformer's KV cache), so a step costs the same at the end of a sentence as at its start.
Beam search scores a hypothesis by log P(y | x) / len(y)^length_penalty and finishes a sentence
once `beam` hypotheses have ended in <eos>; with beam 1 it is exactly greedy decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmzoo.data.examples import collate_pairs
from lmzoo.data.tokenizer import Tokenizer
from lmzoo.inference.sampling import SamplingOptions, next_token
from lmzoo.inference.text import encode_source
from lmzoo.models.base import PAD_ID, Seq2SeqModel, eval_mode, select_rows


@dataclass
class Hypothesis:
    tokens: list[int]  # target ids, without <bos> and <eos>
    score: float  # logprob / len^length_penalty: what beams are ranked by
    logprob: float


def _banned(scores: torch.Tensor, tokenizer_ids: tuple[int, ...]) -> torch.Tensor:
    scores[:, list(tokenizer_ids)] = float("-inf")
    return scores


@torch.inference_mode()
def decode_batch(
    model: Seq2SeqModel,
    src: torch.Tensor,
    *,
    bos_id: int,
    eos_id: int,
    max_len: int,
    options: SamplingOptions | None = None,
    generator: torch.Generator | None = None,
    banned_ids: tuple[int, ...] = (),
) -> list[list[int]]:
    """Greedy (options None or greedy) or sampled decoding of a batch of sources (B, S)."""
    options = options or SamplingOptions(greedy=True)
    src_mask = src == PAD_ID
    memory = model.encode(src, src_mask)
    state = model.init_decode_state(memory, src_mask)
    batch = src.shape[0]
    tokens = torch.full((batch, 1), bos_id, dtype=torch.long, device=src.device)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=src.device)
    seen = torch.zeros(batch, model.head.vocab_size, dtype=torch.bool, device=src.device)
    for _ in range(max_len):
        logits, state = model.decode(tokens, memory, src_mask, state)
        scores = _banned(logits[:, -1].float(), banned_ids)
        choice = next_token(scores, options, seen=seen, generator=generator)  # (B,)
        seen[torch.arange(batch), choice] = True
        for row, token in enumerate(choice.tolist()):
            if not done[row] and token != eos_id:
                outputs[row].append(token)
        done |= choice == eos_id
        if bool(done.all()):
            break
        tokens = choice[:, None]
    return outputs


@torch.inference_mode()
def beam_search(
    model: Seq2SeqModel,
    src: torch.Tensor,
    *,
    beam: int,
    bos_id: int,
    eos_id: int,
    max_len: int,
    length_penalty: float = 1.0,
    n_best: int = 1,
    banned_ids: tuple[int, ...] = (),
) -> list[list[Hypothesis]]:
    """The n best hypotheses of each source in the batch (B, S), best first."""
    batch, device = src.shape[0], src.device
    n_best = min(n_best, beam)
    src_mask = src == PAD_ID
    memory = model.encode(src, src_mask)
    rows = torch.arange(batch, device=device).repeat_interleave(beam)  # hypothesis -> sentence
    memory, src_mask = select_rows(memory, rows), src_mask.index_select(0, rows)
    state = model.init_decode_state(memory, src_mask)
    alive_tokens: list[list[int]] = [[] for _ in range(batch * beam)]
    alive_scores = torch.full((batch, beam), float("-inf"), device=device)
    alive_scores[:, 0] = 0.0  # all beams start identical: expand only the first
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    done = [False] * batch
    last = torch.full((batch * beam, 1), bos_id, dtype=torch.long, device=device)

    def ranked(tokens: list[int], logprob: float) -> Hypothesis:
        return Hypothesis(tokens, logprob / max(1, len(tokens) + 1) ** length_penalty, logprob)

    for step in range(max_len):
        logits, state = model.decode(last, memory, src_mask, state)
        logprobs = _banned(logits[:, -1].float().log_softmax(-1), banned_ids)  # (B*K, V)
        vocab = logprobs.shape[-1]
        candidates = (alive_scores.view(-1, 1) + logprobs).view(batch, beam * vocab)
        top_scores, top_ids = candidates.topk(2 * beam, dim=-1)  # (B, 2K)
        picked = []
        for b in range(batch):
            kept = _extend_beams(
                b,
                beam,
                vocab,
                eos_id,
                top_scores[b].tolist(),
                top_ids[b].tolist(),
                done[b],
                lambda row, score, b=b, tokens=alive_tokens: finished[b].append(ranked(tokens[row], score)),
            )
            done[b] = done[b] or len(finished[b]) >= beam
            picked += kept
        if all(done):
            break
        next_rows, next_tokens, next_scores = (list(column) for column in zip(*picked, strict=True))
        alive_tokens = [alive_tokens[r] + [t] for r, t in zip(next_rows, next_tokens, strict=True)]
        alive_scores = torch.tensor(next_scores, device=device).view(batch, beam)
        state = model.reorder_state(state, torch.tensor(next_rows, device=device))
        last = torch.tensor(next_tokens, device=device).view(-1, 1)
        if step == max_len - 1:
            break
    for b in range(batch):
        if len(finished[b]) < n_best:  # out of length: the best unfinished beams count too
            for k in range(beam):
                score = float(alive_scores[b, k])
                if score > float("-inf"):
                    finished[b].append(ranked(alive_tokens[b * beam + k], score))
        finished[b].sort(key=lambda h: h.score, reverse=True)
    return [hyps[:n_best] for hyps in finished]


def _extend_beams(
    b: int,
    beam: int,
    vocab: int,
    eos_id: int,
    scores: list[float],
    flat_ids: list[int],
    done: bool,
    finish: Any,
) -> list[tuple[int, int, float]]:
    """Sentence b's next `beam` (row, token, score) from its 2K best candidates, best first. An <eos> among
    the top `beam` candidates ends a hypothesis (`finish(row, score)`); a finished sentence keeps dummy
    beams in place so the batch keeps its shape."""
    picked: list[tuple[int, int, float]] = []
    for rank, (score, flat) in enumerate(zip(scores, flat_ids, strict=True)):
        source_beam, token = divmod(flat, vocab)
        row = b * beam + source_beam
        if done or score == float("-inf"):
            break
        if token == eos_id:
            if rank < beam:
                finish(row, score)
            continue
        picked.append((row, token, score))
        if len(picked) == beam:
            break
    return picked + [(b * beam, PAD_ID, float("-inf"))] * (beam - len(picked))


def translate(
    model: Seq2SeqModel,
    source_tokenizer: Tokenizer,
    target_tokenizer: Tokenizer,
    text: str,
    *,
    max_len: int,
    beam: int = 1,
    length_penalty: float = 1.0,
    n_best: int = 1,
    warn: Callable[[str], None] | None = None,
) -> list[tuple[str, float]]:
    """(translation, score) pairs for one sentence: greedy when beam is 1, else the n best beams."""
    src = encode_source(model, source_tokenizer, text, warn)
    hyps = beam_search(
        model,
        src,
        beam=beam,
        bos_id=target_tokenizer.bos_id,
        eos_id=target_tokenizer.eos_id,
        max_len=max_len,
        length_penalty=length_penalty,
        n_best=n_best,
        banned_ids=target_tokenizer.never_generated,
    )[0]
    return [(target_tokenizer.decode(h.tokens), h.score) for h in hyps]


def translate_corpus(
    model: Seq2SeqModel,
    sources: list[str],
    source_tokenizer: Tokenizer,
    target_tokenizer: Tokenizer,
    *,
    max_len: int,
    beam: int = 1,
    length_penalty: float = 1.0,
    batch_size: int = 64,
    device: torch.device,
) -> list[str]:
    """Translate sentences (greedy for beam 1, decoded `batch_size` at a time by the batched engine; else
    beam search in length-sorted batches), in input order."""
    tgt = target_tokenizer
    banned = tgt.never_generated
    encoded = [source_tokenizer.encode(s)[: max_len - 1] + [source_tokenizer.eos_id] for s in sources]
    if beam == 1:
        from lmzoo.inference.engine import Engine
        from lmzoo.inference.loaded import LoadedModel

        lm = LoadedModel(model, source_tokenizer, target_tokenizer, max_target_len=max_len)
        with eval_mode(model):
            done = Engine(lm, batch_size).generate(
                encoded, SamplingOptions(max_new_tokens=max_len, greedy=True)
            )
        return [tgt.decode([step.id for step in generation.steps]) for generation in done]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(sources)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            src = collate_pairs(
                [(encoded[i], []) for i in chunk], bos_id=tgt.bos_id, eos_id=tgt.eos_id
            ).source
            src = src.to(device)
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
            for i, found in zip(chunk, hyps, strict=True):
                outputs[i] = tgt.decode(found[0].tokens)
    return outputs
