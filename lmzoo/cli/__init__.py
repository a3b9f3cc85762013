"""The `lmzoo` command line: a thin typer layer over the library (lmzoo.run.Run and friends).

Each command module registers its verbs on `lmzoo.cli.app.app`; every verb parses its arguments,
calls one library function and prints. Importing this package imports no torch.
"""

from lmzoo.cli import (
    commands,  # noqa: F401  (train, generate, eval, merge, models)
    compare,  # noqa: F401  (compare, report)
    data,  # noqa: F401  (prepare)
    harness,  # noqa: F401  (lm-eval: lm-evaluation-harness with the lmzoo model)
    inspect,  # noqa: F401  (score, attention, tokenize)
    interop,  # noqa: F401  (import, export)
    retrieval,  # noqa: F401  (index, rag index)
    serve,  # noqa: F401  (serve: OpenAI-compatible HTTP API and MCP)
    stages,  # noqa: F401  (suite: the instruction suite of the training stages)
)
from lmzoo.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    app()
