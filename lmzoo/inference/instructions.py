"""Scoring instruction following: greedy exact match per task and overall, and a style-preference rate.

A response matches when it equals the record's `output` after trimming surrounding whitespace and one
final full stop (`STYLE_SUFFIX`) from both: the full stop is a matter of style, not of correctness,
and the style rate (the share of responses that end with it) is reported beside the match rate. With a
reference model, the KL divergence of the model from it is measured along sampled responses.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lmzoo.data.examples import collate_sequences
from lmzoo.errors import DataError
from lmzoo.inference.complete import Completion, complete
from lmzoo.inference.loaded import LoadedModel
from lmzoo.inference.sampling import SamplingOptions
from lmzoo.models.base import PAD_ID, eval_mode

STYLE_SUFFIX = "."
INSTRUCTION_FIELDS = ("instruction", "input", "output")


def strip_style(text: str, suffix: str = STYLE_SUFFIX) -> str:
    """The answer without surrounding whitespace and without one final `suffix`."""
    text = text.strip()
    if suffix and text.endswith(suffix):
        text = text[: -len(suffix)].rstrip()
    return text


def is_exact_match(response: str, expected: str, suffix: str = STYLE_SUFFIX) -> bool:
    return strip_style(response, suffix) == strip_style(expected, suffix)


def has_style(response: str, suffix: str = STYLE_SUFFIX) -> bool:
    return bool(suffix) and response.strip().endswith(suffix)


def render_prompt(template: str, record: dict[str, str]) -> str:
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def encode_prompts(
    lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int, where: str = "prompts"
) -> list[list[int]]:
    """Token ids of each prompt; one that leaves no room for `max_new_tokens` in the model's context is
    a DataError naming its record (counted from 1)."""
    encoded = [lm.tokenizer.encode(p) or [lm.tokenizer.bos_id] for p in prompts]
    context = lm.context_len
    if context is not None:
        for number, ids in enumerate(encoded, start=1):
            if len(ids) + max_new_tokens > context:
                raise DataError(
                    f"{where} record {number}: the prompt is {len(ids)} tokens; with {max_new_tokens} new "
                    f"tokens it is longer than the model's context of {context}"
                )
    return encoded


def teacher_forced(completions: Sequence[Completion], eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of prompt + response (+ <eos> where the response ended there) for one forward pass:
    inputs (B, T) and targets (B, T), PAD except at the response's tokens."""
    rows = []
    for c in completions:
        response = c.ids + ([eos_id] if c.finished else [])
        ids = c.prompt_ids + response
        rows.append((ids[:-1], [PAD_ID] * (len(c.prompt_ids) - 1) + response))
    return collate_sequences(rows)


@dataclass
class TaskScore:
    count: int = 0
    matches: int = 0
    styled: int = 0

    def add(self, match: bool, styled: bool) -> None:
        self.count, self.matches, self.styled = self.count + 1, self.matches + match, self.styled + styled

    def as_dict(self) -> dict[str, float]:
        return {
            "count": self.count,
            "exact_match": self.matches / max(1, self.count),
            "style_rate": self.styled / max(1, self.count),
        }


@dataclass
class InstructionScores:
    """Exact match and style rate overall and per task; KL to a reference (nats per response) if asked."""

    overall: TaskScore
    tasks: dict[str, TaskScore]
    response_tokens: float  # mean new tokens per greedy response (<eos> not counted)
    kl: float | None = None
    completions: list[Completion] = field(default_factory=list)  # the greedy responses, record by record

    @property
    def responses(self) -> list[str]:
        return [c.text for c in self.completions]

    @property
    def exact_match(self) -> float:
        return self.overall.as_dict()["exact_match"]

    @property
    def style_rate(self) -> float:
        return self.overall.as_dict()["style_rate"]

    def as_dict(self) -> dict[str, object]:
        return {
            **self.overall.as_dict(),
            "response_tokens": self.response_tokens,
            "kl": self.kl,
            "tasks": {name: score.as_dict() for name, score in sorted(self.tasks.items())},
        }


def evaluate_instructions(
    lm: LoadedModel,
    records: Sequence[dict[str, str]],
    template: str,
    *,
    max_new_tokens: int = 32,
    suffix: str = STYLE_SUFFIX,
    reference: LoadedModel | None = None,
    seed: int = 0,
    where: str = "instructions",
) -> InstructionScores:
    """Greedy responses to each record's prompt, scored by exact match against `output` (per `task`,
    when records name one) and by style; with `reference`, the mean KL(model || reference) summed over
    the tokens of responses sampled at temperature 1 from a generator seeded with `seed`."""
    prompts = encode_prompts(lm, [render_prompt(template, r) for r in records], max_new_tokens, where)
    greedy = complete(lm, prompts, SamplingOptions(max_new_tokens=max_new_tokens, greedy=True))
    overall, tasks = TaskScore(), defaultdict[str, TaskScore](TaskScore)
    for record, completion in zip(records, greedy, strict=True):
        match = is_exact_match(completion.text, record["output"], suffix)
        styled = has_style(completion.text, suffix)
        overall.add(match, styled)
        tasks[record.get("task") or "all"].add(match, styled)
    length = sum(len(c.ids) for c in greedy) / max(1, len(greedy))
    kl = None
    if reference is not None:
        kl = sampled_kl(lm, reference, prompts, max_new_tokens=max_new_tokens, seed=seed)
    return InstructionScores(overall, dict(tasks), length, kl, greedy)


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position (..., V) -> (...): the full sum over the vocabulary, in nats."""
    logp, logq = logits.float().log_softmax(-1), ref_logits.float().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def sampled_kl(
    lm: LoadedModel,
    reference: LoadedModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    seed: int = 0,
    batch_size: int = 64,
) -> float:
    """Mean over prompts of sum_t KL(pi(.|x, y<t) || pi_ref(.|x, y<t)) along responses y sampled from pi."""
    generator = torch.Generator(device=lm.device).manual_seed(seed)
    options = SamplingOptions(max_new_tokens=max_new_tokens, temperature=1.0)
    samples = complete(lm, prompts, options, generator=generator)
    total = 0.0
    with torch.inference_mode(), eval_mode(lm.model), eval_mode(reference.model):
        for start in range(0, len(samples), batch_size):
            inputs, targets = teacher_forced(samples[start : start + batch_size], lm.tokenizer.eos_id)
            inputs, targets = inputs.to(lm.device), targets.to(lm.device)
            logits, _ = lm.model(inputs)  # (B, T, V)
            ref_logits, _ = reference.model(inputs.to(reference.device))  # (B, T, V)
            per_token = token_kl(logits, ref_logits.to(logits.device)) * (targets != PAD_ID)  # (B, T)
            total += float(per_token.sum())
    return total / max(1, len(samples))
