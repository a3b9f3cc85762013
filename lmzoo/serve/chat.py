"""POST /v1/chat/completions: the messages rendered with the run's chat template (`Run.chat_template`:
an instruction-tuned run's own template, else the default dialogue one; lmzoo.inference.chat), then
decoded like a completion by the run's engine. A reply ends at the template's stops, the request's
`stop`, <eos>, or `max_completion_tokens` (`max_tokens`). Seq2seq runs have no chat template: 400.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmzoo.errors import ConfigError
from lmzoo.inference.decoding import Step
from lmzoo.serve.completions import Completion, Meta, Plan, completion_usage, sampling_fields
from lmzoo.serve.errors import bad_request
from lmzoo.serve.schema import ChatRequest

if TYPE_CHECKING:
    from lmzoo.run import Run


def chat_plan(run: Run, request: ChatRequest) -> Plan:
    """The prompt of a chat request (token ids) and how to decode it, checked against the run."""
    try:
        template = run.chat_template()
    except ConfigError as err:
        raise bad_request(str(err), "model", "chat_not_supported") from None
    tokenizer = run.tokenizer
    try:
        ids, unknown = template.render([(m.role, m.text) for m in request.messages], tokenizer)
    except ConfigError as err:
        raise bad_request(str(err), "messages", "invalid_messages") from None
    warnings = []
    if unknown:
        shown = ", ".join(repr(p) for p in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        warnings.append(
            f"{len(unknown)} piece(s) of the messages are not in the vocabulary ({shown}); read as <unk>"
        )
    sampling = sampling_fields(request)
    sampling["stop"] = list(dict.fromkeys([*template.stops, *(request.stops or [])]))
    return Plan([ids], request.n, sampling, request.seed, request.alternatives[1], warnings=warnings)


class ChatFormat:
    """The shapes of /v1/chat/completions: the whole response, and the chunks of a streamed one."""

    prefix = "chatcmpl"

    def __init__(self, logprobs: bool) -> None:
        self.logprobs = logprobs

    def body(self, completion: Completion, meta: Meta) -> dict[str, Any]:
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": self._logprobs(c.steps),
                "finish_reason": c.finish_reason,
            }
            for c in completion.choices
        ]
        body = {**meta.head("chat.completion"), "choices": choices, "usage": completion_usage(completion)}
        if completion.warnings:
            body["warnings"] = completion.warnings
        return body

    def _logprobs(self, steps: list[Step]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return {"content": [step.probs.to_openai() for step in steps if step.probs is not None]}

    def opening(self, plan: Plan, meta: Meta) -> list[dict[str, Any]]:
        return [self.event(meta, index, {"role": "assistant", "content": ""}) for index in range(plan.n)]

    def piece(
        self, meta: Meta, index: int, text: str, step: Step | None, block: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        logprobs = self._logprobs([step]) if step is not None else None
        return self.event(meta, index, {"content": text}, logprobs=logprobs) if text or logprobs else None

    def closing(self, completion: Completion, meta: Meta) -> list[dict[str, Any]]:
        return [self.event(meta, c.index, {}, c.finish_reason) for c in completion.choices]

    def event(
        self, meta: Meta, index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None
    ) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**meta.head("chat.completion.chunk"), "choices": [choice]}

    def usage(self, completion: Completion, meta: Meta) -> dict[str, Any]:
        return {**meta.head("chat.completion.chunk"), "choices": [], "usage": completion_usage(completion)}
