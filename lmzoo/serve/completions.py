"""What POST /v1/completions computes, in a worker thread holding the run's lock.

Language models continue the prompt; seq2seq runs translate it on the same endpoint. Generation is
`lmzoo.inference.scoring.generate_with_probs` (Run.generate's decoding, with each step's distribution seen),
so a generated token's logprob and top alternatives are those of the very step that chose it: the
model's own distribution, before temperature, top-k or top-p. With `echo`, the prompt's tokens are
scored by `probe.prompt_logprobs`: each given all tokens before it, the first one null (OpenAI's
shape). `text_offset` counts characters from the start of the prompt, with or without echo.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmzoo.run import Run
from lmzoo.serve.errors import bad_request
from lmzoo.serve.probe import Entry, prompt_logprobs
from lmzoo.serve.runs import Budget
from lmzoo.serve.schema import CompletionRequest

# (choice index, text piece, its logprobs block or None); index -1 once, when the request is accepted
OnPiece = Callable[[int, str, dict[str, Any] | None], None]


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str
    logprobs: dict[str, Any] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Completion:
    choices: list[Choice]
    n: int = 1  # choices per prompt
    warnings: list[str] = field(default_factory=list)


def complete(
    run: Run, budget: Budget, request: CompletionRequest, *, device: str, on_piece: OnPiece | None = None
) -> Completion:
    """Every choice of the request: for each prompt, `n` of them (index = prompt * n + i, as OpenAI's)."""
    if request.echo and run.kind == "seq2seq":
        raise bad_request("echo is for language models; a seq2seq run translates the prompt", "echo")
    warnings = [w for prompt in request.prompts for w in check_prompt(run, prompt)]
    run.sampling(**sampling_fields(request))  # a bad combination with the run's defaults: 400 before any work
    emit = on_piece or (lambda index, piece, logprobs: None)
    emit(-1, "", None)
    choices = []
    for p, prompt in enumerate(request.prompts):
        for i in range(request.n):
            seed = None if request.seed is None else request.seed + i
            choices.append(one_choice(run, budget, request, prompt, p * request.n + i, seed, device, emit))
    return Completion(choices, request.n, list(dict.fromkeys(warnings)))


def check_prompt(run: Run, prompt: str) -> list[str]:
    """A prompt with no piece the model knows is a 400; a few unknown pieces are read as <unk> (a warning)."""
    tokenizer = run.tokenizer
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


def sampling_fields(request: CompletionRequest) -> dict[str, Any]:
    """The request's sampling fields as Run.sampling overrides (None: the run's `sample:` value)."""
    return dict(
        max_new_tokens=request.max_tokens or None,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        repetition_penalty=request.repetition_penalty,
        stop=request.stops,
        ignore_eos=request.ignore_eos or None,
    )


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


def one_choice(
    run: Run,
    budget: Budget,
    request: CompletionRequest,
    prompt: str,
    index: int,
    seed: int | None,
    device: str,
    emit: OnPiece,
) -> Choice:
    k = request.logprobs
    entries: list[Entry] = []
    if request.echo:
        entries = prompt_logprobs(run, prompt, k, device=device) if k is not None else []
        emit(index, prompt, logprobs_block(entries, 0) if k is not None else None)
    position, pieces, produced, finish = len(prompt), [], 0, "length"
    if request.max_tokens > 0:
        decoding = run.decode(prompt, device=device, seed=seed, top_logprobs=k, **sampling_fields(request))
        for step in decoding:
            budget.check()
            entry: Entry = (step.text, None, None)
            if k is not None and step.probs is not None:
                top: dict[str, float] = {}
                for text, _, logprob in step.probs.top[:k]:
                    top.setdefault(text, logprob)
                entry = (step.text, step.probs.logprob, top)
            entries.append(entry)
            emit(index, step.text, logprobs_block([entry], position) if k is not None else None)
            pieces.append(step.text)
            position += len(step.text)
        produced, finish = decoding.completion_tokens, decoding.finish_reason or "length"
    budget.check()
    text = "".join(pieces)
    return Choice(
        index=index,
        text=(prompt + text) if request.echo else text,
        finish_reason=finish,
        logprobs=logprobs_block(entries, 0 if request.echo else len(prompt)) if k is not None else None,
        prompt_tokens=len(run.tokenizer.encode(prompt)),
        completion_tokens=produced,
    )


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(completion: Completion, *, cid: str, created: int, model: str) -> dict[str, Any]:
    """The JSON of a non-streamed response."""
    choices = completion.choices
    prompt_tokens = sum(c.prompt_tokens for c in choices if c.index % completion.n == 0)  # once per prompt
    body: dict[str, Any] = {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"text": c.text, "index": c.index, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
            for c in choices
        ],
        "usage": usage(prompt_tokens, sum(c.completion_tokens for c in choices)),
    }
    if completion.warnings:
        body["warnings"] = completion.warnings
    return body


def chunk(
    cid: str, created: int, model: str, index: int, text: str, finish: str | None, logprobs: Any = None
) -> dict[str, Any]:
    """One server-sent event of a streamed response."""
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}],
    }
