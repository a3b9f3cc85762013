"""Pretrained models in and out: `lmzoo import` (a Hugging Face model folder into a run) and
`lmzoo export` (a run out as a Hugging Face folder or a GGUF file)."""

from __future__ import annotations

from pathlib import Path

import typer

from lmzoo.cli.app import BASE_HELP, app, user_errors


@app.command("import")
def import_model(
    source: Path = typer.Argument(
        ...,
        help="A local Hugging Face model folder: config.json, model.safetensors, tokenizer.json.",
        show_default=False,
    ),
    out: Path | None = typer.Option(None, help="The run directory to create (default: runs/<folder name>)."),
    context_length: int | None = typer.Option(
        None, min=1, help="Shorten the model's context (the KV cache holds a whole context)."
    ),
) -> None:
    """Turn a Hugging Face GPT-2, Llama, Mistral, Qwen2 or Qwen3 folder into an lmzoo run.

    In a config, `init_from: hf:DIR` does the same on the way (once; later runs reuse the import).
    """
    with user_errors():
        from lmzoo.interop import import_pretrained

        target = out if out is not None else Path("runs") / source.resolve().name
        run = import_pretrained(source, target, context_length=context_length)
        model = run.config.model
        typer.echo(f"imported: {run.path}  ({model.name}, {run.parameter_count():,} parameters)")


@app.command()
def export(
    run: str = typer.Option(..., "--run", "-r", help="The run directory (or name under ./runs)."),
    out: Path = typer.Option(..., help="The folder (hf) or file (gguf) to write; must not exist."),
    fmt: str = typer.Option(
        "hf",
        "--format",
        help="hf: a folder transformers loads (gpt as GPT-2, modern as Llama/Qwen); "
        "gguf: a llama.cpp file (modern runs with a byte-level BPE vocabulary).",
    ),
    checkpoint: str = typer.Option("best", help="Which checkpoint: best or last."),
    base: Path | None = typer.Option(None, help=BASE_HELP),
) -> None:
    """Write a run in Hugging Face's format or as GGUF; LoRA runs are exported merged."""
    with user_errors():
        from lmzoo.interop import export_run
        from lmzoo.run import Run

        written = export_run(Run.open(run, base=base), out, fmt=fmt, checkpoint_tag=checkpoint)
        typer.echo(f"exported: {written}")
