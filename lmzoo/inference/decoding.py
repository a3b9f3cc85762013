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
from lmzoo.inference.sampling import SamplingOptions, choose_tokens
from lmzoo.inference.text import StopFilter, TextStream, encode_prompt, encode_source, token_text
from lmzoo.models.base import PAD_ID, LanguageModel, Seq2SeqModel

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
        return choose_next([self], logits[None])[0]

    def _seen(self, device: torch.device, vocab: int) -> torch.Tensor:
        """(1, V) bool: the tokens of the text so far (kept only under a repetition penalty)."""
        if self.seen is None:
            self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            if self.context:
                self.seen[0, torch.tensor(self.context, device=device)] = True
        return self.seen

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


def choose_next(sequences: Sequence[SequenceDecoder], logits: torch.Tensor) -> list[int]:
    """Each sequence's next token from its row of this step's scores (n, V), under its own options and
    RNG; what one sequence chooses does not depend on the others in the batch."""
    scores = logits.float()  # (n, V)
    watched = any(s.observe is not None or s.top_logprobs is not None for s in sequences)
    raw = scores.clone() if watched else scores
    banned = {tuple(s.banned) for s in sequences}
    if len(banned) == 1:
        (ids,) = banned
        if ids:
            scores[:, list(ids)] = float("-inf")
    else:
        for row, s in enumerate(sequences):
            scores[row, s.banned] = float("-inf")
    penalised = [s.options.repetition_penalty != 1.0 for s in sequences]
    seen = None
    if any(penalised):
        vocab, device = scores.shape[-1], scores.device
        blank = torch.zeros(1, vocab, dtype=torch.bool, device=device)
        seen = torch.cat(
            [s._seen(device, vocab) if p else blank for s, p in zip(sequences, penalised, strict=True)]
        )
    tokens = choose_tokens(
        scores, [s.options for s in sequences], seen=seen, generators=[s.generator for s in sequences]
    ).tolist()
    for row, (s, token) in enumerate(zip(sequences, tokens, strict=True)):
        if s.seen is not None:
            s.seen[0, token] = True
        if s.observe is not None:
            s.observe(raw[row], token)
        if s.top_logprobs is not None and s.tokenizer is not None:
            s._probs = step_probs(raw[row], token, s.tokenizer, s.top_logprobs)
    return tokens


class LMStepper:
    """A language model's side of decoding: the prompt once, then one token at a time with the state.

    Prompts longer than the model's context keep their end. `cache`: "dynamic" (the model's own
    state), "static" (a fixed-shape KV cache) or "compiled" (static, with the one-token step compiled:
    CUDA graphs on CUDA); all three give the same tokens.
    """

    def __init__(self, model: LanguageModel, prompt_ids: Sequence[int], cache: str = "dynamic") -> None:
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
    """A seq2seq model's side of decoding: the source (1, S) encoded once (by `first`), then the target
    from <bos>."""

    def __init__(self, model: Seq2SeqModel, src: torch.Tensor, bos_id: int) -> None:
        self.model, self.bos_id, self.src = model, bos_id, src
        self.device = src.device
        self.memory: Any = None
        self.src_mask: Any = None
        self.state: Any = None

    def first(self) -> torch.Tensor:
        self.src_mask = self.src == PAD_ID
        self.memory = self.model.encode(self.src, self.src_mask)
        self.state = self.model.init_decode_state(self.memory, self.src_mask)
        return self.next(self.bos_id)

    def next(self, token: int) -> torch.Tensor:
        tokens = torch.tensor([[token]], device=self.device)
        logits, self.state = self.model.decode(tokens, self.memory, self.src_mask, self.state)
        return logits[0, -1]


def start_state(model: LanguageModel, cache: str = "dynamic") -> object:
    """The decoding state to feed the prompt with: a fixed-shape one for cache static/compiled."""
    if cache not in CACHES:
        raise ConfigError(f"cache must be one of {', '.join(CACHES)}, not {cache!r}", param="cache")
    if cache == "dynamic":
        return model.init_state(1)
    state = model.static_state(1, compile=cache == "compiled")
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


@dataclass
class Prepared:
    """One sequence ready to decode: the model side (`stepper`), its `SequenceDecoder`, and how many
    tokens the prompt (or source) has."""

    stepper: LMStepper | Seq2SeqStepper
    sequence: SequenceDecoder
    prompt_tokens: int


def prepare(
    lm: LoadedModel,
    prompt: str | Sequence[int],
    options: SamplingOptions,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    top_logprobs: int | None = None,
    warn: Callable[[str], None] | None = None,
    cache: str = "dynamic",
) -> Prepared:
    """The stepper and sequence state of one prompt: what `decode` runs, and what the batched engine
    (lmzoo.inference.engine) prefills and then steps with many others. `prompt` is text, or token ids
    (a language model's prompt; a seq2seq model's source ids with their <eos>)."""
    tokenizer = lm.output_tokenizer
    if seed is not None:
        generator = torch.Generator(device=lm.device).manual_seed(seed)
    stepper: LMStepper | Seq2SeqStepper
    if lm.kind == "seq2seq":
        if cache != "dynamic":
            raise ConfigError(
                f"cache {cache!r} is for decoder-only language models, not seq2seq runs", param="cache"
            )
        if isinstance(prompt, str):
            src = encode_source(lm.seq2seq_model, lm.tokenizer, prompt, warn)
        else:
            src = torch.tensor([list(prompt)], device=lm.device)
        stepper, context, prompt_tokens = (
            Seq2SeqStepper(lm.seq2seq_model, src, tokenizer.bos_id),
            [],
            src.shape[1],
        )
        options = replace(options, max_new_tokens=min(lm.max_target_len, options.max_new_tokens))
        end_ids: tuple[int, ...] = () if options.ignore_eos else (tokenizer.eos_id,)
    else:
        context = encode_prompt(tokenizer, prompt, warn) if isinstance(prompt, str) else list(prompt)
        stepper, prompt_tokens = LMStepper(lm.language_model, context, cache), len(context)
        end_ids = () if tokenizer.eos_is_text or options.ignore_eos else tokenizer.end_ids
    sequence = SequenceDecoder(
        options,
        tokenizer=tokenizer,
        context=context,
        generator=generator,
        top_logprobs=top_logprobs,
        banned_ids=tokenizer.never_generated,
        end_ids=end_ids,
    )
    return Prepared(stepper, sequence, prompt_tokens)


def decode(
    lm: LoadedModel,
    prompt: str | Sequence[int],
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
    each step's `StepProbs` with that many alternatives. Seq2seq output ends at <eos> (unless
    `ignore_eos`) or the run's data.max_len.
    """
    ready = prepare(
        lm, prompt, options, seed=seed, generator=generator, top_logprobs=top_logprobs, warn=warn, cache=cache
    )
    return Decoding(run_decoder(ready.stepper, ready.sequence), ready.sequence, ready.prompt_tokens)


def generate_ids(
    model: LanguageModel,
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
        if source is None:
            raise ConfigError(
                "next tokens of a seq2seq model need the source sentence: pass source=", param="source"
            )
        model = lm.seq2seq_model
        stepper = Seq2SeqStepper(model, encode_source(model, lm.tokenizer, source), tokenizer.bos_id)
        logits = stepper.first()
        for token in tokenizer.encode(prefix):
            logits = stepper.next(token)
    else:
        logits = LMStepper(lm.language_model, encode_prompt(tokenizer, prefix)).first()
    logprobs = logits.float().log_softmax(-1)
    values, ids = logprobs.topk(min(k, logprobs.numel()))
    return [(tokenizer.decode([i]), i, v) for v, i in zip(values.tolist(), ids.tolist(), strict=True)]
