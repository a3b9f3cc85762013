"""Reading the prompts the batched engine admits in one step: together, in as few forward passes as
their model allows, giving each the scores and state it gets read alone.

How a model's rows take prompts (`DecodingSlots.prefill`):

- "padded": prompts of any lengths in one pass, right-padded. A decoder-only LM's causal attention
  never lets a position see a later one, so padding after a prompt changes nothing in it; a seq2seq
  encoder masks (or packs) a source's padding, and the first target step attends to no padding.
- "equal": prompts of one length per pass (a recurrent LM's state would run on through padding).
- "alone": one prompt per pass (a family without batched rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmzoo.inference.decoding import LMStepper, Seq2SeqStepper
from lmzoo.models.base import PAD_ID, LanguageModel, Seq2SeqModel


@dataclass
class Prefilled:
    """One forward pass over some prompts: which (`members`, indices into the steppers given), the
    scores of the token after each (k, V), the batched state (row i is members[i]) and each prompt's
    length (LMs: tokens read; seq2seq: target tokens read, the <bos>)."""

    members: list[int]
    logits: torch.Tensor
    state: Any
    lengths: list[int]


def groups(steppers: Sequence[LMStepper | Seq2SeqStepper], how: str) -> list[list[int]]:
    """Which prompts share a forward pass."""
    if how == "alone":
        return [[index] for index in range(len(steppers))]
    if how == "padded":
        return [list(range(len(steppers)))]
    by_length: dict[int, list[int]] = {}
    for index, stepper in enumerate(steppers):
        size = len(stepper.ids) if isinstance(stepper, LMStepper) else stepper.src.shape[1]
        by_length.setdefault(size, []).append(index)
    return list(by_length.values())


def prefill(steppers: Sequence[LMStepper | Seq2SeqStepper], members: list[int]) -> Prefilled:
    """Read the prompts (or sources) of `members` in one forward pass."""
    chosen = [steppers[i] for i in members]
    first = chosen[0]
    if isinstance(first, LMStepper):
        return _read_prompts(first.model, [s.ids for s in chosen if isinstance(s, LMStepper)], members)
    sources = [s.src[0] for s in chosen if isinstance(s, Seq2SeqStepper)]
    assert isinstance(first, Seq2SeqStepper)
    return _read_sources(first.model, sources, first.bos_id, members)


def _read_prompts(model: LanguageModel, prompts: list[list[int]], members: list[int]) -> Prefilled:
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in prompts]
    batch = torch.full((len(prompts), max(lengths)), PAD_ID, dtype=torch.long)
    for row, ids in enumerate(prompts):
        batch[row, : len(ids)] = torch.tensor(ids)
    logits, state = model(batch.to(device), model.init_state(len(prompts)))  # (k, T, V)
    last = torch.tensor(lengths, device=device) - 1
    return Prefilled(members, logits[torch.arange(len(prompts), device=device), last], state, lengths)


def _read_sources(
    model: Seq2SeqModel, sources: list[torch.Tensor], bos_id: int, members: list[int]
) -> Prefilled:
    width = max(len(src) for src in sources)
    src = sources[0].new_full((len(sources), width), PAD_ID)
    for row, ids in enumerate(sources):
        src[row, : len(ids)] = ids
    src_mask = src == PAD_ID
    memory = model.encode(src, src_mask)
    state = model.init_decode_state(memory, src_mask)
    bos = src.new_full((len(sources), 1), bos_id)
    logits, state = model.decode(bos, memory, src_mask, state)  # (k, 1, V)
    return Prefilled(members, logits[:, -1], (memory, src_mask, state), [1] * len(sources))
