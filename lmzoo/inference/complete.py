"""Many completions at once: the one place evaluation and RL rollouts get text from a language model.

`complete(lm, prompts, options, n=...)` returns n completions of every prompt. Prompts of the same
length in tokens decode together as one batch (no padding, so no model needs an attention mask): the
prompts go through the model once, then each step feeds every row's new token with the batched state
(KV cache or recurrent state). A row ends at <eos> (the tokenizer's, unless <eos> is text or
`ignore_eos`) or after `max_new_tokens`; the batch ends when every row has. Greedy rows give the
tokens `decode` gives one at a time; sampled rows draw from one generator, so a seeded generator makes
the whole call reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch

from lmzoo.errors import ConfigError
from lmzoo.inference.loaded import LoadedModel
from lmzoo.inference.sampling import SamplingOptions, next_token
from lmzoo.inference.text import encode_prompt
from lmzoo.models.base import LanguageModel, eval_mode


@dataclass
class Completion:
    """One completion: the prompt's ids, the new ids (without the <eos> that ended them), and its text."""

    prompt_ids: list[int]
    ids: list[int]
    finished: bool  # ended at <eos>; False: stopped at max_new_tokens
    text: str


def complete(
    lm: LoadedModel,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    options: SamplingOptions,
    *,
    n: int = 1,
    generator: torch.Generator | None = None,
    max_rows: int = 256,
) -> list[Completion]:
    """`n` completions of each prompt (text or token ids), prompt by prompt: [p0 x n, p1 x n, ...].

    At most `max_rows` sequences decode in one batch. Stop strings are not applied here.
    """
    if lm.kind != "lm":
        raise ConfigError("completions need a language model; this run is a seq2seq model", param="run")
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}", param="n")
    if options.stop:
        raise ConfigError("stop strings are not applied to batched completions", param="stop")
    tokenizer = lm.tokenizer
    encoded = [encode_prompt(tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
    context = lm.context_len
    if context is not None:
        encoded = [ids[-context:] for ids in encoded]
    if any(not ids for ids in encoded):
        raise ConfigError("every prompt needs at least one token", param="prompts")
    rows = [ids for ids in encoded for _ in range(n)]
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
    groups: list[list[int]] = []
    for index in order:
        if groups and len(rows[groups[-1][0]]) == len(rows[index]) and len(groups[-1]) < max_rows:
            groups[-1].append(index)
        else:
            groups.append([index])
    results: list[Completion | None] = [None] * len(rows)
    end_id = None if tokenizer.eos_is_text or options.ignore_eos else tokenizer.eos_id
    banned = [tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id]
    with torch.inference_mode(), eval_mode(lm.model):
        for group in groups:
            new_ids, finished = _decode_group(
                lm, [rows[i] for i in group], options, generator, end_id, banned
            )
            for index, ids, done in zip(group, new_ids, finished, strict=True):
                results[index] = Completion(rows[index], ids, done, tokenizer.decode(ids))
    return [r for r in results if r is not None]


def _decode_group(
    lm: LoadedModel,
    prompts: list[list[int]],
    options: SamplingOptions,
    generator: torch.Generator | None,
    end_id: int | None,
    banned: list[int],
) -> tuple[list[list[int]], list[bool]]:
    """Decode rows whose prompts have one length: (new ids per row, ended at <eos> per row)."""
    model, device = cast(LanguageModel, lm.model), lm.device
    ids = torch.tensor(prompts, device=device)  # (B, L)
    batch = ids.shape[0]
    logits, state = model(ids, model.init_state(batch))  # (B, L, V)
    scores = logits[:, -1].float()  # (B, V)
    seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, ids, True)  # (B, V)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    chosen: list[torch.Tensor] = []
    for _ in range(options.max_new_tokens):
        scores[:, banned] = float("-inf")
        token = next_token(scores, options, seen=seen, generator=generator)  # (B,)
        token = torch.where(done, torch.zeros_like(token), token)  # finished rows: a pad, ignored
        chosen.append(token)
        seen.scatter_(1, token[:, None], True)
        if end_id is not None:
            done |= token == end_id
        if bool(done.all()):
            break
        logits, state = model(token[:, None], state)  # (B, 1, V)
        scores = logits[:, -1].float()
    table = torch.stack(chosen, dim=1).tolist() if chosen else [[] for _ in range(batch)]
    new_ids: list[list[int]] = []
    ended: list[bool] = []
    for row in table:
        if end_id is not None and end_id in row:
            new_ids.append(row[: row.index(end_id)])
            ended.append(True)
        else:
            new_ids.append(row)
            ended.append(False)
    return new_ids, ended
