"""The /v1/completions request: a strict pydantic model (an unknown field or a wrong type is a 400 that
names it) and the limits checked on top of it.

OpenAI fields this server does not implement (`frequency_penalty`, `presence_penalty`, `best_of`,
`logit_bias`, `suffix`) are accepted at their neutral values, since client wrappers send them always;
any other value is a 400 that names the field and says it is not supported."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmzoo.serve.errors import APIError, bad_request
from lmzoo.serve.limits import Limits

MAX_STOPS = 4  # as OpenAI


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI's legacy completions request; `top_k` and `repetition_penalty` are extensions (as vLLM's).

    Sampling fields left out take the run's `sample:` section; `temperature` 0 is greedy decoding.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Annotated[str, Field(min_length=1)]
    prompt: str | list[str]
    max_tokens: Annotated[int, Field(ge=0)] = 16
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    ignore_eos: bool = False  # as vLLM's: go on after <eos> up to max_tokens (fixed-length load tests)
    stop: str | list[str] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Annotated[int, Field(ge=0)] | None = None
    echo: bool = False
    user: str | None = None  # accepted and ignored, as a single-user server
    # OpenAI's fields this server does not implement: only their neutral values (see NOT_SUPPORTED)
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def stops(self) -> list[str] | None:
        return None if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


# field -> (whether the request's value is neutral, what this server accepts)
NOT_SUPPORTED: dict[str, tuple[Callable[[CompletionRequest], bool], str]] = {
    "frequency_penalty": (lambda r: not r.frequency_penalty, "0 or null"),
    "presence_penalty": (lambda r: not r.presence_penalty, "0 or null"),
    "best_of": (lambda r: r.best_of is None or r.best_of == r.n, "null or equal to n"),
    "logit_bias": (lambda r: not r.logit_bias, "null or {}"),
    "suffix": (lambda r: not r.suffix, 'null or ""'),
}


def parse_request(body: bytes, limits: Limits) -> CompletionRequest:
    """The validated request, or an APIError naming what is wrong."""
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise bad_request(f"the request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    try:
        request = CompletionRequest.model_validate(raw)
    except ValidationError as err:
        raise validation_error(err) from None
    check_limits(request, limits)
    return request


def validation_error(err: ValidationError) -> APIError:
    """The first problem pydantic found, as one OpenAI-shaped 400 naming the field."""
    first = err.errors()[0]
    param = str(first["loc"][0]) if first["loc"] else None
    if first["type"] == "extra_forbidden":
        accepted = ", ".join(CompletionRequest.model_fields)
        return bad_request(f"unknown field {param!r}; accepted fields: {accepted}", param, "unknown_field")
    if first["type"] == "missing":
        return bad_request(f"{param}: this field is required", param, "missing_field")
    code = "invalid_type" if first["type"].endswith("_type") else "invalid_value"
    return bad_request(f"{param}: {first['msg']}", param, code)


def check_limits(request: CompletionRequest, limits: Limits) -> None:
    """Sizes and counts over the server's limits, and combinations this server does not serve."""
    prompts = request.prompts
    if not prompts:
        raise bad_request("prompt: give a string or a non-empty list of strings", "prompt")
    if len(prompts) > limits.max_prompts:
        raise bad_request(f"prompt: {len(prompts)} prompts; this server takes {limits.max_prompts}", "prompt")
    longest = max(len(p) for p in prompts)
    if longest > limits.max_prompt_chars:
        raise bad_request(
            f"prompt: {longest} characters; this server takes {limits.max_prompt_chars}",
            "prompt",
            "prompt_too_long",
        )
    over = [
        (name, value, limit)
        for name, value, limit in (
            ("max_tokens", request.max_tokens, limits.max_tokens),
            ("n", request.n, limits.max_n),
            ("logprobs", request.logprobs or 0, limits.max_logprobs),
        )
        if value > limit
    ]
    if over:
        name, value, limit = over[0]
        raise bad_request(f"{name}: {value} is over this server's limit of {limit}", name, "over_limit")
    stops = request.stops or []
    if len(stops) > MAX_STOPS or any(not s or len(s) > 100 for s in stops):
        raise bad_request(f"stop: up to {MAX_STOPS} non-empty strings of at most 100 characters", "stop")
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options needs stream: true", "stream_options")
    for name, (neutral, accepted) in NOT_SUPPORTED.items():
        if not neutral(request):
            shown = json.dumps(getattr(request, name))[:100]
            raise bad_request(
                f"{name}: {shown} is not supported by this server (it takes {accepted}); leave it out",
                name,
                "unsupported_value",
            )
