"""The typer app every command module registers on, and the one place user errors become one line.

torch and the models are imported inside the commands, so `lmzoo --help` starts instantly. A
problem the user can fix ends as one `error: ...` line on stderr with exit code 2 (see
lmzoo.errors), never a traceback; Ctrl-C ends with exit code 130.
"""

from __future__ import annotations

import contextlib
import re
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


# library parameters whose command-line flag is not --<name with dashes>
FLAGS = {"checkpoint_tag": "--checkpoint", "fmt": "--format", "temperature": "--knn-temperature"}


def flag_of(param: str) -> str:
    return FLAGS.get(param, "--" + param.replace("_", "-"))


def for_the_command_line(err: LmzooError) -> str:
    """The error's message with the parameter it names shown as its flag (`n_best` -> `--n-best`,
    `pass base=DIR` -> `pass --base DIR`)."""
    text = str(err)
    if err.param is None:
        return text
    flag = flag_of(err.param)
    pattern = rf"(?<![\w.-]){re.escape(err.param)}(=)?(?![\w.])"
    return re.sub(pattern, lambda m: flag + (" " if m.group(1) else ""), text)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn lmzoo's user-facing errors (and Ctrl-C) into one line and an exit code."""
    try:
        yield
    except LmzooError as err:
        typer.echo(f"error: {for_the_command_line(err)}", err=True)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        raise typer.Exit(130) from None


def warn(message: str) -> None:
    typer.echo(message, err=True)


def prompts(seed: str | None, verb: str, label: str = "seed> ") -> Iterator[str]:
    """The seed text, or (without one) lines typed at an interactive prompt until 'exit' or Ctrl-D."""
    if seed is not None:
        yield seed
        return
    warn(f"lmzoo: {verb} (type a text; 'exit' or Ctrl-D quits)")
    while True:
        try:
            prompt = input(label)
        except EOFError:
            return
        if prompt.strip() == "exit":
            return
        yield prompt


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
