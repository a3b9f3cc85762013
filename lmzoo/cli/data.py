"""`lmzoo prepare`: tokenize a config's text corpus once into memory-mapped token files (lmzoo.data.prepare).

`lmzoo train` prepares on its own when it needs to; this verb does it ahead of time (on a login node, in a
job step of its own), checks a prepared corpus against its sources, or prepares it again.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from lmzoo.cli.app import app, user_errors


@app.command()
def prepare(
    config: Path = typer.Argument(..., help="YAML run config, e.g. configs/gpt.yaml.", show_default=False),
    overrides: list[str] | None = typer.Argument(
        None,
        help="Overrides as section.key=value, e.g. data.train=corpus/ data.workers=2.",
        show_default=False,
    ),
    verify: bool = typer.Option(
        False,
        "--verify",
        help="Rehash every source (not only size and time) and prepare again if one changed.",
    ),
    force: bool = typer.Option(
        False, "--force", help="Prepare again even when the prepared files are current."
    ),
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Progress bars with MB/s and ETA (default: on a terminal)."
    ),
) -> None:
    """Tokenize the config's text corpus once into flat token files per split (train does it when needed)."""
    with user_errors():
        from lmzoo.data.prepare import prepare_corpus
        from lmzoo.errors import ConfigError
        from lmzoo.run import Run, load_config

        loaded = load_config(config, list(overrides or []))
        if loaded.data.format != "text":
            raise ConfigError(
                f"data.format: lmzoo prepare prepares text corpora; {loaded.data.format} examples are read "
                "as they stream, with nothing to prepare"
            )
        tokenizer = Run.open(loaded.init_from).tokenizer if loaded.init_from else loaded.tokenizer
        show = sys.stderr.isatty() if progress is None else progress
        corpus = prepare_corpus(loaded.data, tokenizer, verify=verify, force=force, progress=show)
        manifest = corpus.manifest
        state = "prepared" if corpus.fresh else "up to date"
        typer.echo(
            f"{state}: {corpus.directory}  ({corpus.tokenizer.kind} tokenizer, "
            f"{corpus.tokenizer.vocab_size:,} tokens, {manifest['dtype']})"
        )
        for name, info in manifest["splits"].items():
            docs = f"  {info['documents']:,} documents" if info["documents"] else ""
            typer.echo(f"  {name:<5} {info['tokens']:>15,} tokens{docs}")
        if manifest["skipped"]:
            typer.echo(f"  skipped {len(manifest['skipped']):,} empty file(s), e.g. {manifest['skipped'][0]}")
