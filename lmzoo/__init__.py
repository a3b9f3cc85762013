"""lmzoo: a zoo of PyTorch language models driven by YAML configs and one CLI.

    from lmzoo import Run
    run = Run.open("lstm")                 # a run directory, a name under ./runs, or None: the newest
    print("".join(run.generate("ROMEO:", max_new_tokens=60)))

The package root stays light: `Run` (and torch with it) is imported on first use, so that
`lmzoo --help` is instant.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Run", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Run":
        from lmzoo.run import Run

        return Run
    raise AttributeError(f"module 'lmzoo' has no attribute {name!r}")
