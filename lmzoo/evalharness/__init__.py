"""lm-evaluation-harness on lmzoo runs, in process: the `lmzoo` model (lmzoo.evalharness.model) and a
small local task, `lmzoo_shakespeare` (perplexity, next line, line completion; tasks/ here), that needs
no network. Needs the `harness` extra (`pip install 'lmzoo[harness]'`).

    lmzoo lm-eval run --model lmzoo --model_args run=runs/gpt --tasks lmzoo_shakespeare

`lmzoo lm-eval` is lm-eval's own command line with the `lmzoo` model registered and `TASKS` on its
include path. Importing lmzoo.evalharness.model registers the model for lm-eval's Python API too.
"""

from __future__ import annotations

from pathlib import Path

TASKS = Path(__file__).resolve().parent / "tasks"
