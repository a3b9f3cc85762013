"""The typer app every command module registers on, and the one place user errors become one line.

torch and the models are imported inside the commands, so `lmzoo --help` starts instantly. A
problem the user can fix ends as one `error: ...` line on stderr with exit code 2 (see
lmzoo.errors), never a traceback; Ctrl-C ends with exit code 130.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from lmzoo import __version__
from lmzoo.errors import LmzooError

app = typer.Typer(
    name="lmzoo",
    help="Train, sample, evaluate, inspect and serve language models from YAML configs.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

RUN_HELP = "Run directory or name under ./runs (default: the newest run)."
BASE_HELP = "Fine-tunes: the base (init_from) run's directory, if it moved since training."
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps."


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn lmzoo's user-facing errors (and Ctrl-C) into one line and an exit code."""
    try:
        yield
    except LmzooError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        raise typer.Exit(130) from None


def warn(message: str) -> None:
    typer.echo(message, err=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lmzoo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Train, sample, evaluate, inspect and serve language models from YAML configs."""
