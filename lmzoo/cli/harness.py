"""`lmzoo lm-eval`: lm-evaluation-harness's own command line with the `lmzoo` model registered."""

from __future__ import annotations

import importlib.util
import sys

import typer

from lmzoo.cli.app import app, user_errors

SUBCOMMANDS = ("run", "ls", "validate")


@app.command(
    "lm-eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)
def lm_eval(ctx: typer.Context) -> None:
    """lm-evaluation-harness on runs: lm-eval's command line (every flag passes through) with the lmzoo
    model and the local lmzoo_shakespeare task, e.g. `lmzoo lm-eval run --model lmzoo --model_args
    run=runs/gpt --tasks lmzoo_shakespeare`."""
    with user_errors():
        from lmzoo.errors import ConfigError

        if importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("lmzoo lm-eval needs lm-eval; install it with: pip install 'lmzoo[harness]'")
        from lm_eval.__main__ import cli_evaluate

        import lmzoo.evalharness.model  # noqa: F401  (registers the `lmzoo` model)
        from lmzoo.evalharness import TASKS

        args = list(ctx.args)
        if args and "--include_path" not in args and not {"-h", "--help"} & set(args):
            args += ["--include_path", str(TASKS)]
        argv, sys.argv = sys.argv, ["lm-eval", *args]
        try:
            cli_evaluate()
        finally:
            sys.argv = argv
