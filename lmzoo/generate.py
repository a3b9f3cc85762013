"""Sampling from language models: greedy, temperature, top-k, top-p, repetition penalty, stop strings.

The prompt is fed once; after that each new token is fed alone together with the model's state
(the recurrent hidden state, or the Transformer's KV cache), so the cost of a token does not grow
with the text already generated. Output is streamed as text pieces as soon as they decode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from lmzoo.tokenizers import Tokenizer


@dataclass
class SamplingOptions:
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    greedy: bool = False  # temperature 0 means greedy too
    stop: Sequence[str] = field(default_factory=tuple)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty: scores of tokens already in the text are divided (if > 0) or multiplied by it."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest scores in each row; the rest become -inf."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability mass reaches p."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cumulative - sorted_logits.softmax(-1) >= p  # mass before this token already reaches p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(
    logits: torch.Tensor, options: SamplingOptions, *, seen: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Pick the next id for each row of logits (B, V)."""
    logits = apply_repetition_penalty(logits, seen, options.repetition_penalty)
    if options.greedy or options.temperature == 0:
        return logits.argmax(-1)
    logits = logits / options.temperature
    if options.top_k is not None:
        logits = filter_top_k(logits, options.top_k)
    if options.top_p is not None and options.top_p < 1.0:
        logits = filter_top_p(logits, options.top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_ids(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    options: SamplingOptions,
    *,
    generator: torch.Generator | None = None,
    banned_ids: Sequence[int] = (),
    observe: Callable[[torch.Tensor, int], None] | None = None,
    cache: str = "dynamic",
) -> Iterator[int]:
    """Yield new token ids one at a time. Prompts longer than the model's context keep their end.

    `observe(logits (V,), token)`, if given, sees the model's raw scores of each step (before
    penalties, bans and temperature) and the token chosen from them (lmzoo generate --show-probs).
    `cache`: "dynamic" (the model's own state), "static" (fixed-shape KV cache where the model has one)
    or "compiled" (static, with the one-token step compiled: CUDA graphs on CUDA); the same tokens.
    """
    device = next(model.parameters()).device
    context = getattr(model, "context_len", None)
    ids = list(prompt_ids)[-context:] if context else list(prompt_ids)
    if not ids:
        raise ValueError("generation needs at least one prompt token")
    logits, state = model(torch.tensor([ids], device=device), start_state(model, cache))  # the prompt, once
    vocab = logits.shape[-1]
    seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
    seen[0, torch.tensor(ids, device=device)] = True
    banned = torch.tensor(list(banned_ids), dtype=torch.long, device=device)
    for _ in range(options.max_new_tokens):
        scores = logits[:, -1].float()  # (1, V)
        raw = scores.clone() if observe is not None else None
        if len(banned):
            scores[:, banned] = float("-inf")
        token = next_token(scores, options, seen=seen, generator=generator)  # (1,)
        if raw is not None and observe is not None:
            observe(raw[0], int(token))
        yield int(token)
        seen[0, token] = True
        logits, state = model(token.view(1, 1), state)  # one token, with the state


def start_state(model: torch.nn.Module, cache: str = "dynamic") -> object:
    """The decoding state to feed the prompt with: the model's static state when asked for and it has one."""
    if cache not in ("dynamic", "static", "compiled"):
        raise ValueError(f"cache must be dynamic, static or compiled, not {cache!r}")
    if cache != "dynamic" and hasattr(model, "static_state"):
        state = model.static_state(1, compile=cache == "compiled")
        if state is not None:
            return state
    return model.init_state(1)


class TextStream:
    """Turns ids into text pieces as soon as they decode cleanly (whole characters, word spacing)."""

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids = list(context)[-1:]  # one token of context gives the right spacing for the first piece
        self.prefix, self.read = 0, len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


def encode_prompt(tokenizer: Tokenizer, prompt: str, warn: Callable[[str], None] | None = None) -> list[int]:
    """Prompt ids; unseen characters or words become <unk> with one warning; "" starts a new line."""
    unknown = tokenizer.unknown_pieces(prompt)
    if unknown and warn is not None:
        shown = ", ".join(repr(p) for p in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        warn(
            f"warning: {len(unknown)} piece(s) of the prompt are not in the vocabulary ({shown}); read as <unk>"
        )
    ids = tokenizer.encode(prompt)
    return ids or start_ids(tokenizer)


def start_ids(tokenizer: Tokenizer) -> list[int]:
    """What an empty prompt starts from: a line break when the vocabulary has one, else <bos>."""
    newline = tokenizer.encode("\n")
    return newline if newline and tokenizer.unk_id not in newline else [tokenizer.bos_id]


def generate(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    options: SamplingOptions,
    *,
    generator: torch.Generator | None = None,
    warn: Callable[[str], None] | None = None,
) -> Iterator[str]:
    """Stream the continuation of `prompt` as text pieces, stopping at any of `options.stop`."""
    prompt_ids = encode_prompt(tokenizer, prompt, warn)
    banned = [tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id]
    stream = TextStream(tokenizer, context=prompt_ids)
    pending = ""
    for token in generate_ids(model, prompt_ids, options, generator=generator, banned_ids=banned):
        pending += stream.push(token)
        cut = _stop_index(pending, options.stop)
        if cut is not None:
            if pending[:cut]:
                yield pending[:cut]
            return
        keep = _partial_stop_suffix(pending, options.stop)
        if len(pending) > keep:
            yield pending[: len(pending) - keep]
            pending = pending[len(pending) - keep :]
    pending += stream.flush()
    cut = _stop_index(pending, options.stop)
    if pending[:cut]:
        yield pending[:cut]


def _stop_index(text: str, stops: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _partial_stop_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-size:]):
                longest = size
                break
    return longest
