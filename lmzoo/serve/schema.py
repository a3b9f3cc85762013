"""The /v1/completions and /v1/chat/completions requests: strict pydantic models (an unknown field or a
wrong type is a 400 that names it) and the limits checked on top of them.

OpenAI fields this server does not implement (`frequency_penalty`, `presence_penalty`, `best_of`,
`logit_bias`, `suffix`) are accepted at their neutral values, since client wrappers send them always;
any other value is a 400 that names the field and says it is not supported."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmzoo.serve.errors import APIError, bad_request
from lmzoo.serve.limits import Limits

Prompt = str | list[int]  # text, or token ids (as lm-evaluation-harness sends them)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What completions and chat completions share: the run, sampling, choices, streaming.
    `top_k`, `repetition_penalty` and `ignore_eos` are extensions (as vLLM's).

    Sampling fields left out take the run's `sample:` section; `temperature` 0 is greedy decoding.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Annotated[str, Field(min_length=1)]
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
    user: str | None = None  # accepted and ignored, as a single-user server
    # OpenAI's fields this server does not implement: only their neutral values (see NOT_SUPPORTED)
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, float] | None = None

    @property
    def stops(self) -> list[str] | None:
        return None if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def new_tokens(self) -> tuple[str, int]:
        """(the field that says how many tokens to generate, its value)."""
        raise NotImplementedError

    @property
    def alternatives(self) -> tuple[str, int | None]:
        """(the field that asks for top alternatives per token, how many; None: no logprobs)."""
        raise NotImplementedError


class CompletionRequest(SamplingRequest):
    """OpenAI's legacy completions request. `prompt` may also be token ids, one list or several."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=0)] = 16
    logprobs: Annotated[int, Field(ge=0)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: str | None = None

    @property
    def prompts(self) -> list[Prompt]:
        """Each prompt: a string, or a list of token ids (a flat list of ints is one prompt)."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt)  # type: ignore[arg-type]

    @property
    def new_tokens(self) -> tuple[str, int]:
        return "max_tokens", self.max_tokens

    @property
    def alternatives(self) -> tuple[str, int | None]:
        return "logprobs", self.logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None  # accepted and ignored

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(SamplingRequest):
    """OpenAI's chat completions request: `messages` rendered with the run's chat template."""

    messages: list[ChatMessage]
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # OpenAI's older name
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0)] | None = None

    @property
    def new_tokens(self) -> tuple[str, int]:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens or 0

    @property
    def alternatives(self) -> tuple[str, int | None]:
        return "top_logprobs", (self.top_logprobs or 0) if self.logprobs else None


# field -> (whether the request's value is neutral, what this server accepts)
NOT_SUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "frequency_penalty": (lambda r: not r.frequency_penalty, "0 or null"),
    "presence_penalty": (lambda r: not r.presence_penalty, "0 or null"),
    "best_of": (lambda r: r.best_of is None or r.best_of == r.n, "null or equal to n"),
    "logit_bias": (lambda r: not r.logit_bias, "null or {}"),
    "suffix": (lambda r: not r.suffix, 'null or ""'),
}


def read_json(body: bytes, model: str | None = None) -> dict[str, Any]:
    """The request body as a JSON object; on a run's own routes (`model`) the model field may be left
    out (or null), and must name that run when given."""
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise bad_request(f"the request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    if model is not None:
        if raw.get("model") not in (None, model):
            raise bad_request(f"model: this route serves {model!r}, not {str(raw['model'])[:100]!r}", "model")
        raw["model"] = model
    return raw


def parse_request(body: bytes, limits: Limits, model: str | None = None) -> CompletionRequest:
    """The validated completions request, or an APIError naming what is wrong."""
    request = validated(CompletionRequest, read_json(body, model))
    check_limits(request, limits)
    return request


def parse_chat_request(body: bytes, limits: Limits, model: str | None = None) -> ChatRequest:
    """The validated chat request, or an APIError naming what is wrong."""
    request = validated(ChatRequest, read_json(body, model))
    if not request.messages:
        raise bad_request("messages: give at least one message", "messages")
    if request.top_logprobs is not None and not request.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    check_sampling_limits(request, limits)
    return request


def validated(schema: type[SamplingRequest], raw: dict[str, Any]) -> Any:
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise validation_error(err, schema) from None


def validation_error(err: ValidationError, schema: type[BaseModel] = CompletionRequest) -> APIError:
    """The first problem pydantic found, as one OpenAI-shaped 400 naming the field."""
    first = err.errors()[0]
    param = str(first["loc"][0]) if first["loc"] else None
    if first["type"] == "extra_forbidden":
        accepted = ", ".join(schema.model_fields)
        return bad_request(f"unknown field {param!r}; accepted fields: {accepted}", param, "unknown_field")
    if first["type"] == "missing":
        return bad_request(f"{param}: this field is required", param, "missing_field")
    code = "invalid_type" if first["type"].endswith("_type") else "invalid_value"
    return bad_request(f"{param}: {first['msg']}", param, code)


def check_limits(request: CompletionRequest, limits: Limits) -> None:
    """Sizes and counts over the server's limits, and combinations this server does not serve."""
    prompts = request.prompts
    if not prompts or any(isinstance(p, list) and not p for p in prompts):
        raise bad_request(
            "prompt: give a string, a non-empty list of strings, or non-empty lists of token ids", "prompt"
        )
    if len(prompts) > limits.max_prompts:
        raise bad_request(f"prompt: {len(prompts)} prompts; this server takes {limits.max_prompts}", "prompt")
    for kind, limit, sizes in (
        ("characters", limits.max_prompt_chars, [len(p) for p in prompts if isinstance(p, str)]),
        ("tokens", limits.max_prompt_tokens, [len(p) for p in prompts if isinstance(p, list)]),
    ):
        if sizes and max(sizes) > limit:
            raise bad_request(
                f"prompt: {max(sizes)} {kind}; this server takes {limit}", "prompt", "prompt_too_long"
            )
    check_sampling_limits(request, limits)


def check_sampling_limits(request: SamplingRequest, limits: Limits) -> None:
    """Tokens, choices, alternatives and stop strings over the limits; OpenAI fields at values this
    server cannot honour."""
    tokens_field, tokens = request.new_tokens
    logprobs_field, alternatives = request.alternatives
    over = [
        (name, value, limit)
        for name, value, limit in (
            (tokens_field, tokens, limits.max_tokens),
            ("n", request.n, limits.max_n),
            (logprobs_field, alternatives or 0, limits.max_logprobs),
        )
        if value > limit
    ]
    if over:
        name, value, limit = over[0]
        raise bad_request(f"{name}: {value} is over this server's limit of {limit}", name, "over_limit")
    stops = request.stops or []
    if len(stops) > limits.max_stops or any(not s or len(s) > 100 for s in stops):
        raise bad_request(
            f"stop: up to {limits.max_stops} non-empty strings of at most 100 characters", "stop"
        )
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options needs stream: true", "stream_options")
    for name, (neutral, accepted) in NOT_SUPPORTED.items():
        if name in type(request).model_fields and not neutral(request):
            shown = json.dumps(getattr(request, name))[:100]
            raise bad_request(
                f"{name}: {shown} is not supported by this server (it takes {accepted}); leave it out",
                name,
                "unsupported_value",
            )
