"""Comparing runs and reporting on one: `lmzoo compare` and `lmzoo report`."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from lmzoo.cli.app import DEVICE_HELP, RUN_HELP, app, user_errors


@app.command()
def compare(
    configs: list[Path] = typer.Argument(..., help="Two or more run configs, e.g. configs/compare/*.yaml."),
    tokens: int = typer.Option(200_000, "--tokens", "-n", help="Training tokens per run (the budget)."),
    seeds: int = typer.Option(1, "--seeds", help="Train each config with this many seeds (mean ± std)."),
    out: Path = typer.Option(Path("compare"), "--out", help="Folder for runs/ and the compare.* files."),
    device: str | None = typer.Option(None, "--device", help=DEVICE_HELP + " (default: each config's)."),
    prompt: str | None = typer.Option(None, "--prompt", help="Prompt sampled from every model."),
    sample_tokens: int = typer.Option(200, "--sample-tokens", min=1, help="Tokens sampled per model."),
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Progress bars (default: when stderr is a terminal)."
    ),
) -> None:
    """Train configs on the same data, seeds and token budget and rank them by bits per character.

    Finished runs with the same resolved config under --out/runs are reused. Writes compare.md, .csv,
    .json (table, config diff, samples) and compare.png (validation curves) under --out.
    """
    with user_errors():
        from lmzoo.analysis.compare import aggregate
        from lmzoo.analysis.compare import compare as run_comparison
        from lmzoo.analysis.compare_files import sample_all, table_markdown, write_outputs

        show = sys.stderr.isatty() if progress is None else progress
        result = run_comparison(configs, tokens=tokens, seeds=seeds, out=out, device=device, progress=show)
        sample_all(result, prompt=prompt, max_new_tokens=sample_tokens, device=device or "cpu")
        files = write_outputs(result, out)
        typer.echo(table_markdown(aggregate(result.results), seeds), nl=False)
        reused = len(result.results) - result.trained
        typer.echo(
            f"trained {result.trained} run(s), reused {reused}; wrote {', '.join(map(str, files))}", err=True
        )


@app.command()
def report(
    run: str | None = typer.Argument(None, help=RUN_HELP, show_default=False),
    fmt: str = typer.Option("html", "--format", "-f", help="html (self-contained, opens offline) or md."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output file (default: report-<run>.<format>)."
    ),
) -> None:
    """Write one self-contained report of a run from its own files: curves, summary, config, samples."""
    with user_errors():
        from lmzoo.analysis.report import write_report

        path = write_report(run, fmt=fmt, out=out)
        typer.echo(f"wrote {path}", err=True)
