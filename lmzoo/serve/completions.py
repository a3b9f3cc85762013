"""The choices of a completion request, decoded by the run's engine (lmzoo.inference.engine).

Each choice (a prompt, n times) is one sequence the engine decodes together with every other request's;
its seed is `seed + i` for the i-th choice of a prompt. Language models continue the prompt (text or
token ids); seq2seq runs translate it. A generated token's logprob and top alternatives are those of the
step that chose it: the model's own distribution, before temperature, top-k or top-p. With `echo`, the
prompt's tokens are scored by `probe.prompt_logprobs` (the one scorer, so they equal `lmzoo score`):
each given all tokens before it, the first one null (OpenAI's shape); `echo` with `max_tokens: 1` gives
the prompt's logprobs followed by the generated token's, which is how lm-evaluation-harness scores.
`text_offset` counts characters from the start of the prompt, with or without echo.

`Choices.start` checks the request against the run, loads it, scores echo and submits; an error there
is a plain error response. `Choices.finish` waits for the sequences; `cancel` (a client gone) frees
their slots at the engine's next step.
"""

from __future__ import annotations

import asyncio
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmzoo.errors import LmzooError
from lmzoo.inference.decoding import Step
from lmzoo.inference.engine import EngineBusy, Generation, Request
from lmzoo.inference.text import token_pieces
from lmzoo.serve.errors import APIError, Cancelled, bad_request
from lmzoo.serve.probe import Entry, prompt_logprobs, top_map
from lmzoo.serve.runs import Budget, RunRegistry
from lmzoo.serve.schema import CompletionRequest, Prompt, SamplingRequest

if TYPE_CHECKING:
    from lmzoo.run import Run

# (choice index, text piece, its Step (None for an echoed prompt), its legacy logprobs block or None):
# called on the event loop as pieces decode
OnPiece = Callable[[int, str, Step | None, dict[str, Any] | None], None]


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str
    logprobs: dict[str, Any] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    steps: list[Step] = field(default_factory=list)


@dataclass
class Completion:
    choices: list[Choice]
    n: int = 1  # choices per prompt
    warnings: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """What to decode: the prompts (text or ids), n choices each, the Run.sampling overrides, the seed,
    alternatives per token (None: no logprobs), echo, and warnings about the prompts."""

    prompts: list[Prompt]
    n: int
    sampling: dict[str, Any]
    seed: int | None = None
    alternatives: int | None = None
    echo: bool = False
    warnings: list[str] = field(default_factory=list)
    generate: bool = True  # False: max_tokens 0 (echo scores the prompt only)


def sampling_fields(request: SamplingRequest) -> dict[str, Any]:
    """The request's sampling fields as Run.sampling overrides (None: the run's `sample:` value)."""
    return dict(
        max_new_tokens=request.new_tokens[1] or None,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        repetition_penalty=request.repetition_penalty,
        stop=request.stops,
        ignore_eos=request.ignore_eos or None,
    )


def completion_plan(run: Run, request: CompletionRequest) -> Plan:
    """The plan of a /v1/completions request, checked against the run (400s name the field)."""
    if request.echo and run.kind == "seq2seq":
        raise bad_request("echo is for language models; a seq2seq run translates the prompt", "echo")
    warnings = [w for prompt in request.prompts for w in check_prompt(run, prompt)]
    return Plan(
        request.prompts,
        request.n,
        sampling_fields(request),
        request.seed,
        request.logprobs,
        request.echo,
        list(dict.fromkeys(warnings)),
        generate=request.max_tokens > 0,
    )


def check_prompt(run: Run, prompt: Prompt) -> list[str]:
    """A prompt with no piece the model knows, or ids outside its vocabulary, is a 400; a few unknown
    pieces are read as <unk> (a warning)."""
    tokenizer = run.tokenizer
    if isinstance(prompt, list):
        if run.kind == "seq2seq":
            raise bad_request("prompt: token ids are for language models; send a seq2seq run text", "prompt")
        if min(prompt) < 0 or max(prompt) >= tokenizer.vocab_size:
            raise bad_request(
                f"prompt: token ids must be between 0 and {tokenizer.vocab_size - 1} (this run's vocabulary)",
                "prompt",
                "invalid_token",
            )
        return []
    ids = tokenizer.encode(prompt)
    if ids and all(i == tokenizer.unk_id for i in ids):
        raise bad_request(
            "prompt: no character or word of it is in this model's vocabulary", "prompt", "unknown_tokens"
        )
    unknown = tokenizer.unknown_pieces(prompt)
    if not unknown:
        return []
    shown = ", ".join(repr(p) for p in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
    return [f"{len(unknown)} piece(s) of the prompt are not in the vocabulary ({shown}); read as <unk>"]


def logprobs_block(entries: list[Entry], start: int) -> dict[str, Any]:
    """OpenAI's legacy logprobs shape for these tokens, the first at character `start`."""
    offsets, position = [], start
    for text, _, _ in entries:
        offsets.append(position)
        position += len(text)
    return {
        "tokens": [e[0] for e in entries],
        "token_logprobs": [e[1] for e in entries],
        "top_logprobs": [e[2] for e in entries],
        "text_offset": offsets,
    }


class Choices:
    """The choices of one request on run `model`: `plan_for(run)` checks the request against the run."""

    def __init__(
        self,
        registry: RunRegistry,
        budget: Budget,
        model: str,
        plan_for: Callable[[Run], Plan],
        on_piece: OnPiece | None = None,
    ) -> None:
        self.registry, self.budget, self.model = registry, budget, model
        self.plan_for, self.on_piece = plan_for, on_piece
        self.generations: list[Generation] = []
        self.plan: Plan | None = None
        self._echo: list[list[Entry]] = []
        self._texts: list[str] = []  # each prompt's text
        self._counts: list[int] = []  # each prompt's tokens

    async def run(self) -> Completion:
        await self.start()
        return await self.finish()

    async def start(self) -> None:
        registry, budget = self.registry, self.budget
        run, engine = await registry.engine(self.model, budget)
        plan = self.plan = self.plan_for(run)
        try:
            options = run.sampling(**plan.sampling)  # a bad combination with the run's defaults: 400
        except LmzooError as err:
            raise bad_request(str(err)) from None
        tokenizer = run.tokenizer
        self._texts = [p if isinstance(p, str) else "".join(token_pieces(tokenizer, p)) for p in plan.prompts]
        self._counts = [len(p) if isinstance(p, list) else len(tokenizer.encode(p)) for p in plan.prompts]
        k = plan.alternatives
        if plan.echo and k is not None:
            device = registry.device
            self._echo = await registry.call(
                self.model,
                lambda r, b: [prompt_logprobs(r, p, k, device=device) for p in plan.prompts],
                budget,
            )
        if self.on_piece is not None and plan.echo:
            for p, text in enumerate(self._texts):
                block = logprobs_block(self._echo[p], 0) if k is not None else None
                for i in range(plan.n):
                    self.on_piece(p * plan.n + i, text, None, block)
        if not plan.generate:
            return
        requests = [
            Request(
                prompt,
                options,
                seed=None if plan.seed is None else plan.seed + i,
                top_logprobs=k,
                on_step=self._bridge(p * plan.n + i, len(self._texts[p]), k),
                check=budget.check,
            )
            for p, prompt in enumerate(plan.prompts)
            for i in range(plan.n)
        ]
        try:
            self.generations = engine.submit_all(requests)
        except EngineBusy as err:
            raise APIError(429, f"the model {self.model!r} is busy: {err}", code="queue_full") from None

    def _bridge(self, index: int, start: int, k: int | None) -> Callable[[Step], None] | None:
        """Each step as a piece, handed to the event loop (called in the engine's thread)."""
        if self.on_piece is None:
            return None
        loop, on_piece, position = asyncio.get_running_loop(), self.on_piece, [start]

        def forward(step: Step) -> None:
            block = logprobs_block([step_entry(step, k)], position[0]) if k is not None else None
            position[0] += len(step.text)
            try:
                loop.call_soon_threadsafe(on_piece, index, step.text, step, block)
            except RuntimeError:  # the loop is closed: nobody is listening
                raise Cancelled() from None

        return forward

    def cancel(self) -> None:
        self.budget.cancel()
        for generation in self.generations:
            generation.cancel()

    async def finish(self) -> Completion:
        """Wait for every choice; the Completion, or the error that ended one (the others cancelled)."""
        assert self.plan is not None
        try:
            await asyncio.gather(*(asyncio.wrap_future(g.future) for g in self.generations))
        except (APIError, Cancelled):
            self.cancel()
            raise
        except BaseException as err:
            self.cancel()
            if isinstance(err, Exception):
                traceback.print_exception(err, file=sys.stderr)
                raise APIError(
                    500, f"internal error while serving {self.model!r} (logged by the server)"
                ) from None
            raise
        return self._completion()

    def _completion(self) -> Completion:
        plan = self.plan
        assert plan is not None
        k, choices = plan.alternatives, []
        for p in range(len(plan.prompts)):
            for i in range(plan.n):
                index = p * plan.n + i
                generation = self.generations[index] if self.generations else None
                steps = generation.steps if generation is not None else []
                entries = (self._echo[p] if plan.echo and k is not None else []) + [
                    step_entry(s, k) for s in steps
                ]
                text = "".join(s.text for s in steps)
                prompt_text = self._texts[p]
                choices.append(
                    Choice(
                        index=index,
                        text=(prompt_text + text) if plan.echo else text,
                        finish_reason=(generation.finish_reason if generation else None) or "length",
                        logprobs=logprobs_block(entries, 0 if plan.echo else len(prompt_text))
                        if k is not None
                        else None,
                        prompt_tokens=generation.prompt_tokens if generation else self._counts[p],
                        completion_tokens=generation.completion_tokens if generation else 0,
                        steps=steps,
                    )
                )
        return Completion(choices, plan.n, plan.warnings)


def step_entry(step: Step, k: int | None) -> Entry:
    """A generated token's (text, logprob, alternatives) entry; the map is keyed by token text, so it
    holds this step's token (not its visible share of the text, which a stop string may cut)."""
    if k is None or step.probs is None:
        return (step.text, None, None)
    probs = step.probs
    return (
        step.text,
        probs.logprob,
        top_map([(t, v) for t, _, v in probs.top[:k]], probs.token, probs.logprob),
    )


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_usage(completion: Completion) -> dict[str, int]:
    choices = completion.choices
    prompt_tokens = sum(c.prompt_tokens for c in choices if c.index % completion.n == 0)  # once per prompt
    return usage(prompt_tokens, sum(c.completion_tokens for c in choices))


def completion_body(completion: Completion, *, cid: str, created: int, model: str) -> dict[str, Any]:
    """The JSON of a non-streamed response."""
    body: dict[str, Any] = {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"text": c.text, "index": c.index, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
            for c in completion.choices
        ],
        "usage": completion_usage(completion),
    }
    if completion.warnings:
        body["warnings"] = completion.warnings
    return body


@dataclass
class Meta:
    """What every response and event of one request carries."""

    cid: str
    created: int
    model: str

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.cid, "object": kind, "created": self.created, "model": self.model}


class CompletionFormat:
    """The shapes of /v1/completions: the whole response, and the events of a streamed one."""

    prefix = "cmpl"

    def body(self, completion: Completion, meta: Meta) -> dict[str, Any]:
        return completion_body(completion, cid=meta.cid, created=meta.created, model=meta.model)

    def opening(self, plan: Plan, meta: Meta) -> list[dict[str, Any]]:
        return []

    def piece(
        self, meta: Meta, index: int, text: str, step: Step | None, block: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        return self.event(meta, index, text, None, block) if text or block else None

    def closing(self, completion: Completion, meta: Meta) -> list[dict[str, Any]]:
        return [self.event(meta, c.index, "", c.finish_reason) for c in completion.choices]

    def event(
        self, meta: Meta, index: int, text: str, finish: str | None, logprobs: Any = None
    ) -> dict[str, Any]:
        choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}
        return {**meta.head("text_completion"), "choices": [choice]}

    def usage(self, completion: Completion, meta: Meta) -> dict[str, Any]:
        return {**meta.head("text_completion"), "choices": [], "usage": completion_usage(completion)}
