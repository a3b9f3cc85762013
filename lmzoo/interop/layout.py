"""What one Hugging Face architecture needs to cross into one lmzoo family and back, and the registry
of the architectures lmzoo converts.

A `Layout` says which lmzoo `model:` section a config.json describes, which Hugging Face tensor is
which lmzoo tensor (`names`; those in `transposed` are stored the other way round), and for export the
config.json of an lmzoo model and the tensor changes its format needs (zero biases, permuted rows).
Reading, renaming, transposing and checking shapes is the importer's and exporter's, the same for
every architecture, as are the output layer (lm_head.weight, absent when tied) and the vocabulary rows,
which are the Hugging Face ones here: the <pad> row lmzoo puts in front of an imported vocabulary
(lmzoo.data.pretrained_tokenizer) is added and removed there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmzoo.errors import CheckpointError

Tensors = dict[str, torch.Tensor]
# The vocabulary-sized tensors of every decoder family (the decoder shell's names), and Hugging Face's head.
EMBEDDING, HEAD, HF_HEAD = "token_embedding.weight", "head.proj.weight", "lm_head.weight"


@dataclass(frozen=True)
class Specials:
    """The special token ids a Hugging Face config.json states (Hugging Face ids, not lmzoo's)."""

    bos: int | None
    eos: int | list[int] | None
    pad: int | None = None


@dataclass(frozen=True)
class Layout:
    """One Hugging Face architecture <-> one lmzoo family."""

    family: str  # the lmzoo model name
    model_types: tuple[str, ...]  # the config.json model_type values it imports
    model_section: Callable[[dict[str, Any]], dict[str, Any]]  # config.json -> lmzoo model: section
    names: Callable[[Any], list[tuple[str, str]]]  # model config -> (Hugging Face name, lmzoo name) pairs
    hf_config: Callable[
        [Any, int, Specials], dict[str, Any]
    ]  # (model config, vocab, specials) -> config.json
    export_tensors: Callable[[Tensors, Any], Tensors]  # lmzoo tensors as Hugging Face's format has them
    transposed: tuple[str, ...] = ()  # lmzoo names (suffixes) whose Hugging Face tensor is transposed
    ignored: tuple[str, ...] = ()  # checkpoint name suffixes that are buffers, not weights
    canonical: Callable[[str], str] = str  # a checkpoint's tensor name as `names` spells it
    exported_names: Callable[[Any], list[tuple[str, str]]] | None = None  # what export writes, if not `names`


LAYOUTS: list[Layout] = []


def register_layout(layout: Layout) -> Layout:
    LAYOUTS.append(layout)
    return layout


def supported_types() -> str:
    return ", ".join(f"{t} (-> {layout.family})" for layout in LAYOUTS for t in layout.model_types)


def layout_for_type(model_type: str, where: str) -> Layout:
    """The layout that imports `model_type`; anything else is refused in one line naming what is supported."""
    for layout in LAYOUTS:
        if model_type in layout.model_types:
            return layout
    raise CheckpointError(
        f"{where}: model_type {model_type!r} cannot be imported; lmzoo imports {supported_types()}"
    )


def layout_for_family(name: str, kind: str, where: str) -> Layout:
    """The layout exporting lmzoo family `name`, or one line saying why Hugging Face has none."""
    for layout in LAYOUTS:
        if layout.family == name:
            return layout
    families = " and ".join(layout.family for layout in LAYOUTS)
    why = (
        "an encoder-decoder model has no transformers AutoModelForCausalLM counterpart"
        if kind == "seq2seq"
        else "a recurrent language model has no transformers AutoModelForCausalLM counterpart"
    )
    raise CheckpointError(
        f"{where}: model {name!r} cannot be exported ({why}); lmzoo exports {families} runs"
    )


def refuse(where: str, setting: str, value: Any, why: str) -> CheckpointError:
    """The error for a config value lmzoo cannot represent."""
    return CheckpointError(f"{where}: {setting} = {value!r} is not supported ({why})")
