"""Pretrained models in and out: Hugging Face checkpoints into lmzoo runs, runs out to Hugging Face's
format and to GGUF (llama.cpp).

    from lmzoo.interop import import_pretrained, export_run
    run = import_pretrained("models/gpt2", "runs/gpt2")          # lmzoo import models/gpt2 --out runs/gpt2
    export_run(run, "exported/gpt2", fmt="hf")                    # lmzoo export --run runs/gpt2 --out ...

GPT-2 maps onto the gpt family; Llama, Mistral, Qwen2 and Qwen3 onto modern (lmzoo.interop.gpt2,
lmzoo.interop.llama). Nothing here needs `transformers`: config.json and safetensors are read and
written directly (GGUF files with the `gguf` package). Importing this package also lets a run config
say `init_from: hf:DIR`.
"""

from __future__ import annotations

from pathlib import Path

from lmzoo.errors import ConfigError
from lmzoo.interop import gpt2, llama  # noqa: F401  (the architectures register)
from lmzoo.interop.exporter import export_hf
from lmzoo.interop.importer import import_pretrained, init_from_pretrained
from lmzoo.run import Run
from lmzoo.run.config import INIT_FROM_SCHEMES

INIT_FROM_SCHEMES["hf"] = init_from_pretrained
FORMATS = ("hf", "gguf")


def export_run(run: Run, out: str | Path, *, fmt: str = "hf", checkpoint_tag: str = "best") -> Path:
    """Export `run` to `out`: a Hugging Face folder (fmt hf) or a GGUF file for llama.cpp (fmt gguf)."""
    if fmt == "hf":
        return export_hf(run, out, checkpoint_tag)
    if fmt == "gguf":
        from lmzoo.interop.gguf_export import export_gguf

        return export_gguf(run, out, checkpoint_tag)
    raise ConfigError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}", param="fmt")


__all__ = ["FORMATS", "export_run", "import_pretrained"]
