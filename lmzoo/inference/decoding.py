"""The one decoding loop: language models continue a prompt, seq2seq models translate it.

The prompt (or source) is read once; after that each new token is fed alone with the model's state
(the recurrent hidden state, or the Transformer's KV cache), so the cost of a token does not grow
with the text already generated. Every path that writes text goes through `decode`: `Run.generate`,
`lmzoo generate` (with or without --show-probs), /v1/completions and the MCP tools. Stop strings
are applied by `StopFilter` (lmzoo.inference.text): no caller ever sees the start of a stop string.

One sequence's state lives in a `SequenceDecoder` (sampling options, seeded RNG, detokenizer, stop
filter, why it ended); the model side is a stepper (`LMStepper`, `Seq2SeqStepper`) that turns the
chosen token into the next step's scores. A batched engine drives many SequenceDecoders over one
batched model state with the same two calls, `choose` and `accept`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from lmzoo.data.tokenizer import Tokenizer
from lmzoo.errors import ConfigError
from lmzoo.inference.loaded import LoadedModel
from lmzoo.inference.sampling import SamplingOptions, next_token
from lmzoo.inference.text import StopFilter, TextStream, encode_prompt, token_text

CACHES = ("dynamic", "static", "compiled")
Observer = Callable[[torch.Tensor, int], None]


@dataclass
class StepProbs:
    """One generated token: its text, id, log-probability, the top alternatives (text, id, logprob)
    and the entropy (nats) of the distribution it was drawn from (the model's own distribution,
    before temperature, top-k/top-p, repetition penalty and banned ids shape the sampling)."""

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


def step_probs(logits: torch.Tensor, token: int, tokenizer: Tokenizer, top_k: int) -> StepProbs:
    """The record of one step from the model's raw scores (V,) and the token chosen."""
    logprobs = logits.float().log_softmax(-1)
    entropy = float(torch.special.entr(logprobs.exp()).sum())
    top: list[tuple[str, int, float]] = []
    if top_k:
        values, ids = logprobs.topk(min(top_k, logprobs.shape[-1]))
        top = [(token_text(tokenizer, i), i, v) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return StepProbs(token_text(tokenizer, token), token, float(logprobs[token]), top, entropy)


@dataclass
class Step:
    """One generated token and its share of the output text ("" while a character is incomplete)."""

    text: str
    id: int
    probs: StepProbs | None = None


class SequenceDecoder:
    """The decoding state of one sequence: what it has seen, its RNG, its text and its stop strings.

    `choose(logits)` picks the next token from the model's scores (V,); `accept(token)` returns the
    steps that are now safe to show and sets `finish_reason` once the sequence ends: "stop" (a stop
    string, or <eos> where <eos> is not text) or "length" (max_new_tokens reached).
    """

    def __init__(
        self,
        options: SamplingOptions,
        *,
        tokenizer: Tokenizer | None = None,
        context: Sequence[int] = (),
        generator: torch.Generator | None = None,
        top_logprobs: int | None = None,
        banned_ids: Sequence[int] = (),
        end_ids: Sequence[int] = (),
        observe: Observer | None = None,
    ) -> None:
        self.options, self.tokenizer, self.generator = options, tokenizer, generator
        self.top_logprobs, self.observe = top_logprobs, observe
        self.banned, self.end_ids = list(banned_ids), set(end_ids)
        self.stream = TextStream(tokenizer, context) if tokenizer is not None else None
        self.stops: StopFilter[Step] = StopFilter(options.stop)
        self.context = list(context)
        self.seen: torch.Tensor | None = None
        self.produced = 0
        self.finish_reason: str | None = None
        self._probs: StepProbs | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this step's scores (V,), under this sequence's options and RNG."""
        scores = logits.float()[None]  # (1, V)
        if self.seen is None:
            self.seen = torch.zeros_like(scores, dtype=torch.bool)
            if self.context:
                self.seen[0, torch.tensor(self.context, device=scores.device)] = True
        raw = scores.clone() if self.observe or self.top_logprobs is not None else scores
        if self.banned:
            scores[:, self.banned] = float("-inf")
        token = int(next_token(scores, self.options, seen=self.seen, generator=self.generator))
        self.seen[0, token] = True
        if self.observe is not None:
            self.observe(raw[0], token)
        if self.top_logprobs is not None and self.tokenizer is not None:
            self._probs = step_probs(raw[0], token, self.tokenizer, self.top_logprobs)
        return token

    def accept(self, token: int) -> list[Step]:
        """Take the chosen token; the steps now safe to show (their text never holds a stop string)."""
        if token in self.end_ids:
            self.finish_reason = "stop"
            return self._released(self.stops.finish(self._tail()))
        self.produced += 1
        piece = self.stream.push(token) if self.stream is not None else ""
        released = self.stops.push(piece, Step(piece, token, self._probs))
        if self.stops.stopped:
            self.finish_reason = "stop"
        elif self.produced >= self.options.max_new_tokens:
            self.finish_reason = "length"
            released += self.stops.finish(self._tail())
        return self._released(released)

    def _tail(self) -> str:
        return self.stream.flush() if self.stream is not None else ""

    @staticmethod
    def _released(items: list[tuple[str, Step]]) -> list[Step]:
        return [Step(text, step.id, step.probs) for text, step in items]


class LMStepper:
    """A language model's side of decoding: the prompt once, then one token at a time with the state.

    Prompts longer than the model's context keep their end. `cache`: "dynamic" (the model's own
    state), "static" (a fixed-shape KV cache) or "compiled" (static, with the one-token step compiled:
    CUDA graphs on CUDA); all three give the same tokens.
    """

    def __init__(self, model: torch.nn.Module, prompt_ids: Sequence[int], cache: str = "dynamic") -> None:
        context = getattr(model, "context_len", None)
        self.ids = list(prompt_ids)[-context:] if context else list(prompt_ids)
        if not self.ids:
            raise ValueError("generation needs at least one prompt token")
        self.model, self.cache = model, cache
        self.device = next(model.parameters()).device
        self.state: Any = None

    def first(self) -> torch.Tensor:
        """Scores (V,) of the token after the prompt."""
        logits, self.state = self.model(
            torch.tensor([self.ids], device=self.device), start_state(self.model, self.cache)
        )
        return logits[0, -1]

    def next(self, token: int) -> torch.Tensor:
        logits, self.state = self.model(torch.tensor([[token]], device=self.device), self.state)
        return logits[0, -1]


class Seq2SeqStepper:
    """A seq2seq model's side of decoding: the source encoded once, then the target from <bos>."""

    def __init__(self, model: torch.nn.Module, src: torch.Tensor, bos_id: int) -> None:
        from lmzoo.models.base import PAD_ID

        self.model, self.bos_id = model, bos_id
        self.src_mask = src == PAD_ID
        self.memory = model.encode(src, self.src_mask)
        self.state = model.init_decode_state(self.memory, self.src_mask)
        self.device = src.device

    def first(self) -> torch.Tensor:
        return self.next(self.bos_id)

    def next(self, token: int) -> torch.Tensor:
        tokens = torch.tensor([[token]], device=self.device)
        logits, self.state = self.model.decode(tokens, self.memory, self.src_mask, self.state)
        return logits[0, -1]


def start_state(model: torch.nn.Module, cache: str = "dynamic") -> object:
    """The decoding state to feed the prompt with: a fixed-shape one for cache static/compiled."""
    if cache not in CACHES:
        raise ConfigError(f"cache must be one of {', '.join(CACHES)}, not {cache!r}", param="cache")
    if cache == "dynamic":
        return model.init_state(1)
    state = model.static_state(1, compile=cache == "compiled") if hasattr(model, "static_state") else None
    if state is None:
        raise ConfigError(
            f"cache {cache!r} needs a Transformer decoder with a fixed-shape KV cache (gpt, modern); "
            "this model decodes with its own state: use cache dynamic"
        )
    return state


@torch.inference_mode()
def run_decoder(stepper: LMStepper | Seq2SeqStepper, sequence: SequenceDecoder) -> Iterator[Step]:
    """Step the model until the sequence ends, yielding the steps as they become safe to show."""
    logits = stepper.first()
    while True:
        token = sequence.choose(logits)
        yield from sequence.accept(token)
        if sequence.done:
            return
        logits = stepper.next(token)


class Decoding:
    """The steps of one decoded sequence; once iterated to the end, `finish_reason` says why it ended."""

    def __init__(self, steps: Iterator[Step], sequence: SequenceDecoder, prompt_tokens: int) -> None:
        self._steps, self.sequence, self.prompt_tokens = steps, sequence, prompt_tokens

    def __iter__(self) -> Iterator[Step]:
        return self._steps

    @property
    def finish_reason(self) -> str | None:
        return self.sequence.finish_reason

    @property
    def completion_tokens(self) -> int:
        return self.sequence.produced

    def text(self) -> str:
        """Run to the end and return the whole text."""
        return "".join(step.text for step in self)


def decode(
    lm: LoadedModel,
    prompt: str,
    options: SamplingOptions,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    top_logprobs: int | None = None,
    warn: Callable[[str], None] | None = None,
    cache: str = "dynamic",
) -> Decoding:
    """Continue `prompt` (language models) or translate it (seq2seq), one `Step` per token.

    `seed` (or an explicit `generator`) makes sampling reproducible; `top_logprobs` (0 or more) adds
    each step's `StepProbs`
    with that many alternatives. Seq2seq output ends at <eos> or the run's data.max_len.
    """
    tokenizer = lm.output_tokenizer
    if seed is not None:
        generator = torch.Generator(device=lm.device).manual_seed(seed)
    banned = tokenizer.banned_ids
    stepper: LMStepper | Seq2SeqStepper
    if lm.kind == "seq2seq":
        from lmzoo.inference.seq2seq import encode_source

        if cache != "dynamic":
            raise ConfigError(
                f"cache {cache!r} is for decoder-only language models, not seq2seq runs", param="cache"
            )
        src = encode_source(lm.model, lm.tokenizer, prompt, warn)
        stepper, context, prompt_tokens = Seq2SeqStepper(lm.model, src, tokenizer.bos_id), [], src.shape[1]
        options = replace(options, max_new_tokens=min(lm.max_target_len, options.max_new_tokens))
        end_ids: tuple[int, ...] = (tokenizer.eos_id,)
    else:
        context = encode_prompt(tokenizer, prompt, warn)
        stepper, prompt_tokens = LMStepper(lm.model, context, cache), len(context)
        end_ids = () if tokenizer.eos_is_text or options.ignore_eos else tokenizer.end_ids
    sequence = SequenceDecoder(
        options,
        tokenizer=tokenizer,
        context=context,
        generator=generator,
        top_logprobs=top_logprobs,
        banned_ids=banned,
        end_ids=end_ids,
    )
    return Decoding(run_decoder(stepper, sequence), sequence, prompt_tokens)


def generate_ids(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    options: SamplingOptions,
    *,
    generator: torch.Generator | None = None,
    banned_ids: Sequence[int] = (),
    observe: Observer | None = None,
    cache: str = "dynamic",
) -> Iterator[int]:
    """New token ids of a language model, one at a time, without text (benchmarks and tests).

    `observe(logits (V,), token)` sees each step's raw scores and the token chosen from them.
    """
    sequence = SequenceDecoder(
        options, context=prompt_ids, generator=generator, banned_ids=banned_ids, observe=observe
    )
    for step in run_decoder(LMStepper(model, prompt_ids, cache), sequence):
        yield step.id


@torch.inference_mode()
def next_distribution(
    lm: LoadedModel, prefix: str, k: int, *, source: str | None = None
) -> list[tuple[str, int, float]]:
    """The k most likely next tokens (text, id, logprob) after `prefix`; seq2seq models: after the
    target prefix, given `source`."""
    tokenizer = lm.output_tokenizer
    if lm.kind == "seq2seq":
        from lmzoo.inference.seq2seq import encode_source

        if source is None:
            raise ConfigError(
                "next tokens of a seq2seq model need the source sentence: pass source=", param="source"
            )
        stepper: LMStepper | Seq2SeqStepper = Seq2SeqStepper(
            lm.model, encode_source(lm.model, lm.tokenizer, source), tokenizer.bos_id
        )
        logits = stepper.first()
        for token in tokenizer.encode(prefix):
            logits = stepper.next(token)
    else:
        logits = LMStepper(lm.model, encode_prompt(tokenizer, prefix)).first()
    logprobs = logits.float().log_softmax(-1)
    values, ids = logprobs.topk(min(k, logprobs.numel()))
    return [(tokenizer.decode([i]), i, v) for v, i in zip(values.tolist(), ids.tolist(), strict=True)]
