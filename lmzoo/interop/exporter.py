"""An lmzoo run out to Hugging Face's format (`lmzoo export --format hf`): a folder with config.json,
model.safetensors, generation_config.json and the tokenizer files, which
`transformers.AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load with no
custom code: gpt runs as GPT-2, modern runs as Llama, Qwen2 or Qwen3 (lmzoo.interop.layout).

A LoRA run is exported with its updates merged into the weights; adapters add layers those
architectures do not have, and recurrent and seq2seq models have no counterpart there: each is one
line saying so. Nothing here needs `transformers`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmzoo.data.pretrained_tokenizer import PretrainedTokenizer
from lmzoo.data.tokenizer import Tokenizer
from lmzoo.errors import CheckpointError
from lmzoo.interop.checkpoint_dir import CONFIG, WEIGHTS
from lmzoo.interop.hf_tokenizer import write_tokenizer
from lmzoo.interop.layout import EMBEDDING, HEAD, HF_HEAD, Specials, Tensors, layout_for_family
from lmzoo.io import atomic_write_text
from lmzoo.models.peft import merge_finetune
from lmzoo.run import Run


@dataclass
class Exported:
    """A run in Hugging Face's terms: its config.json, its tensors by Hugging Face name, its tokenizer."""

    config: dict[str, Any]
    tensors: Tensors
    tokenizer: Tokenizer
    specials: Specials
    ends: list[int]


def _specials(tokenizer: Tokenizer) -> tuple[Specials, list[int]]:
    """bos/eos/pad ids in the exported vocabulary, and every id that ends a generation."""
    if isinstance(tokenizer, PretrainedTokenizer):
        found = tokenizer.specials
        ends = [i for i in dict.fromkeys([found.get("eos"), *(found.get("ends") or [])]) if i is not None]
        return Specials(bos=found.get("bos"), eos=found.get("eos")), ends
    return Specials(bos=tokenizer.bos_id, eos=tokenizer.eos_id, pad=tokenizer.pad_id), [tokenizer.eos_id]


def merged_model(run: Run, checkpoint_tag: str) -> torch.nn.Module:
    """The run's model with LoRA updates folded into its weights (refused for adapters)."""
    finetune = run.config.finetune
    if finetune is not None and finetune.method == "adapter":
        raise CheckpointError(
            f"{run.path} uses adapters, which add layers GPT-2, Llama and Qwen do not have; "
            "export a LoRA or full fine-tune instead"
        )
    model = run.trained_model(checkpoint_tag, "cpu")
    return merge_finetune(model) if finetune is not None and finetune.method == "lora" else model


def exported(run: Run, checkpoint_tag: str = "best") -> Exported:
    """The run as a Hugging Face model: config.json, tensors by Hugging Face name, tokenizer."""
    model_config = run.config.model
    layout = layout_for_family(model_config.name, run.kind, str(run.path))
    model = merged_model(run, checkpoint_tag)
    tensors = {name: value.detach().float() for name, value in model.state_dict().items()}
    reserved = getattr(model_config, "reserved_ids", 0)
    for name in (EMBEDDING, HEAD):
        if name in tensors:
            tensors[name] = tensors[name][reserved:]
    tokenizer = run.tokenizer
    specials, ends = _specials(tokenizer)
    config = layout.hf_config(model_config, tensors[EMBEDDING].shape[0], specials)
    config["torch_dtype"] = "float32"
    ours = layout.export_tensors(tensors, model_config)
    pairs = (layout.exported_names or layout.names)(model_config)
    pairs += [] if config["tie_word_embeddings"] else [(HF_HEAD, HEAD)]
    out = {}
    for hf, name in pairs:
        value = ours[name].t() if name.endswith(layout.transposed) else ours[name]
        out[hf] = value.contiguous()
    return Exported(config, out, tokenizer, specials, ends)


def _target(out: str | Path) -> Path:
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise CheckpointError(f"{target} already exists; pass out=DIR with a new directory", param="out")
    return target


def export_hf(run: Run, out: str | Path, checkpoint_tag: str = "best") -> Path:
    """Write the run as a Hugging Face model folder `out` (created whole, or not at all)."""
    from safetensors.torch import save_file

    target = _target(out)
    model = exported(run, checkpoint_tag)
    staging = target.with_name(f".{target.name}.export-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        save_file(model.tensors, str(staging / WEIGHTS), metadata={"format": "pt"})
        atomic_write_text(staging / CONFIG, json.dumps(model.config, indent=2))
        generation = {"bos_token_id": model.specials.bos, "eos_token_id": model.ends}
        atomic_write_text(staging / "generation_config.json", json.dumps(generation, indent=2))
        write_tokenizer(model.tokenizer, staging, run.config.model.context_len)
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
