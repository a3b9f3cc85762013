"""Folding a LoRA fine-tune into a plain run (`lmzoo merge`): the same outputs, full weights, no base."""

from __future__ import annotations

from pathlib import Path

from lmzoo.errors import CheckpointError
from lmzoo.models.peft import merge_finetune
from lmzoo.run import Run
from lmzoo.training.rundirs import create


def merge_run(run: Run, out: str | Path | None = None) -> Run:
    """A new run at `out` (default: <run>-merged beside it) whose weights are `run`'s LoRA updates folded
    into its base weights; its config has no init_from and no finetune section."""
    finetune = run.config.finetune
    if finetune is None or finetune.method == "full":
        raise CheckpointError(f"{run.path} is not a LoRA run; its weights are already plain")
    if finetune.method == "adapter":
        raise CheckpointError(
            f"{run.path} uses adapters, which add layers and cannot be folded into the base"
        )
    target = Path(out) if out is not None else None
    if target is not None and target.exists():
        raise CheckpointError(f"{target} already exists; choose another output directory")
    model = merge_finetune(run.trained_model("best", "cpu"))
    config = run.config.model_copy(
        update={
            "init_from": None,
            "finetune": None,
            "name": target.name if target is not None else f"{run.name}-merged",
            "out_dir": str(target.parent if target is not None else run.path.parent),
        }
    )
    merged = create(config)
    merged.save_tokenizers(run.tokenizer, run.target_tokenizer)
    merged.save_checkpoint("best", model, info={**run.info(), "merged_from": str(run.path)})
    return merged
