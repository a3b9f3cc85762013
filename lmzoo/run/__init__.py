"""Runs: `Run`, the one owner of a run directory; loading run configs; checkpoints.

from lmzoo.run import Run, load_config
"""

from lmzoo.run.config import load_config, resolve_config
from lmzoo.run.run import Run

__all__ = ["Run", "load_config", "resolve_config"]
