"""`lmzoo suite`: write the instruction suite the training stages (pre-train, SFT, reward model, RL) use."""

from __future__ import annotations

from pathlib import Path

import typer

from lmzoo.cli.app import app, user_errors


@app.command()
def suite(
    out: Path = typer.Option(Path("data/suite"), "--out", "-o", help="Folder to write the suite's files to."),
    seed: int = typer.Option(0, help="The seed: the same seed writes the same files."),
    train: int = typer.Option(7000, min=1, help="Training records per task."),
    val: int = typer.Option(50, min=1, help="Validation records per task (held-out words and numbers)."),
    test: int = typer.Option(100, min=1, help="Test records per task (held-out words and numbers)."),
    pairs: int = typer.Option(1000, min=1, help="Training preference pairs per task."),
    pairs_held_out: int = typer.Option(50, min=1, help="Validation and test preference pairs per task."),
    style_share: float = typer.Option(
        0.25, min=0.0, max=1.0, help="Share of training answers that end with a full stop (the style)."
    ),
) -> None:
    """Write an instruction suite a small model can learn (reverse, capitals, sort, add, subtract, count,
    copy a field) with held-out splits of unseen words and numbers, its unlabeled form for pre-training,
    and preference pairs (correct vs plausibly wrong; with vs without a final full stop)."""
    with user_errors():
        from lmzoo.stages.suite import SuiteSizes, write_suite

        sizes = SuiteSizes(train, val, test, pairs, pairs_held_out, pairs_held_out)
        written = write_suite(out, seed, sizes, style_share=style_share)
        for name, path in written.items():
            typer.echo(f"{name:<12} {path}")
