"""Retrieval verbs: `lmzoo index` (a kNN-LM datastore for a run) and `lmzoo rag index` (BM25 passages).

Using them: `lmzoo eval/generate --knn DIR` and `lmzoo eval/generate --rag DIR` (lmzoo.cli.commands).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from lmzoo.cli.app import DEVICE_HELP, RUN_HELP, app, user_errors

if TYPE_CHECKING:
    from lmzoo.run import Run

rag_app = typer.Typer(
    help="Passage retrieval (BM25) over a folder of .txt/.md files.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(rag_app, name="rag")


@app.command()
def index(
    run: str | None = typer.Option(None, "--run", "-r", help=RUN_HELP),
    data: list[Path] = typer.Option(
        ..., help="Text file(s) to store (repeat --data for several).", show_default=False
    ),
    out: Path = typer.Option(
        ..., help="Directory to write the datastore to (must not exist).", show_default=False
    ),
    batch_size: int | None = typer.Option(
        None, min=1, help="Windows per batch (default: the run's eval batch)."
    ),
    kind: str = typer.Option(
        "auto", "--index", help="auto (flat up to 131,072 keys, else IVF), flat or ivf."
    ),
    shuffle_values: bool = typer.Option(False, help="Control store: permute the next-token values."),
    checkpoint: str = typer.Option("best", help="Which checkpoint: best or last."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Progress bar (default: on a tty)."
    ),
) -> None:
    """Build a kNN-LM datastore: the run's hidden state at every position of the text -> the next token."""
    with user_errors():
        from lmzoo.device import pick_device
        from lmzoo.retrieval.knn import build_datastore
        from lmzoo.run import Run

        loaded = Run.open(run)
        manifest = build_datastore(
            loaded,
            list(data),
            out,
            checkpoint_tag=checkpoint,
            device=pick_device(device),
            batch_size=batch_size,
            index=kind,
            shuffle_values=shuffle_values,
            progress=sys.stderr.isatty() if progress is None else progress,
        )
        spec = ", ".join(f"{key} {value}" for key, value in manifest["index"].items() if key != "kind")
        typer.echo(
            f"datastore: {out}  ({manifest['size']:,} keys of {manifest['dim']}, {manifest['index']['kind']}"
            f"{' ' + spec if spec else ''}; {manifest['bytes'] / 2**20:.1f} MiB; {manifest['build_seconds']:.1f} s)"
        )


@rag_app.command("index")
def rag_index(
    docs: Path = typer.Argument(
        ..., help="Folder of .txt / .md files (searched recursively).", show_default=False
    ),
    out: Path = typer.Option(
        ..., help="Directory to write the index to (must not exist).", show_default=False
    ),
    passage_chars: int = typer.Option(
        512, min=1, help="About this many characters per passage (whole lines)."
    ),
    overlap_lines: int = typer.Option(1, min=0, help="Lines shared by consecutive passages."),
) -> None:
    """Cut the documents into passages (keeping file and line span) and index them with BM25."""
    with user_errors():
        from lmzoo.retrieval.bm25 import Bm25Index

        manifest = Bm25Index.build(docs, out, passage_chars=passage_chars, overlap_lines=overlap_lines)
        typer.echo(
            f"passage index: {out}  ({manifest['passages']:,} passages from {manifest['files']:,} files)"
        )


def evaluate_with_retrieval(
    run: Run,
    knn: Path | None,
    rag: Path | None,
    data: Path | None,
    split: str,
    checkpoint: str,
    device: str,
    *,
    k: int,
    lmbda: float,
    temperature: float,
    tune: bool,
    passages: int,
) -> list[str]:
    """The lines `lmzoo eval --knn DIR` / `--rag DIR` prints (lmzoo.retrieval.knn_eval / rag)."""
    from lmzoo.device import pick_device

    lines = []
    if knn is not None:
        from lmzoo.retrieval.knn_eval import describe, evaluate_knn

        report = evaluate_knn(
            run, knn, data=data, split=split, k=k, lmbda=lmbda, temperature=temperature,
            tune_options=tune, checkpoint_tag=checkpoint, device=pick_device(device),
        )  # fmt: skip
        lines += describe(report)
    if rag is not None:
        from lmzoo.retrieval import rag as rag_eval

        report = rag_eval.evaluate_rag(
            run,
            rag,
            data=data,
            split=split,
            passages=passages,
            checkpoint_tag=checkpoint,
            device=pick_device(device),
        )
        lines.append(rag_eval.describe(report))
    return lines
