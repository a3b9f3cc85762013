"""Where training numbers go: TensorBoard, metrics.jsonl and the progress bar.

Tags are stable (train/loss, val/loss, val/ppl, lr, grad_norm, tokens_per_sec, ...) and the same
numbers land in metrics.jsonl, one JSON object per logged step, for scripts to read.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmzoo.io import atomic_write_text

METRICS_FILE = "metrics.jsonl"


class Tracker:
    """Writes scalars and text to TensorBoard and metrics.jsonl.

    On resume from step N, records after N (written by the run before it stopped, after its last
    checkpoint) are dropped from both, so the curves show one consistent history.
    """

    def __init__(self, run_dir: Path, *, resume_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        self.metrics_path = run_dir / METRICS_FILE
        if resume_step is not None:
            self._truncate_metrics(resume_step)
        # TensorBoard drops events at steps >= purge_step; step `resume_step` itself is kept, as in metrics.jsonl.
        purge_step = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)
        self.metrics_file = open(self.metrics_path, "a", encoding="utf-8")

    def _truncate_metrics(self, step: int) -> None:
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        record = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}}
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        # TensorBoard renders markdown: indent by four spaces so line breaks survive.
        self.writer.add_text(tag, "    " + text.replace("\n", "\n    "), step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
        self.metrics_file.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl (skipping a torn last line)."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class ProgressBar:
    """A tqdm bar over optimiser steps that shows loss, lr and tokens/s; silent when disabled."""

    def __init__(self, total: int, initial: int, *, enabled: bool, quiet: bool = False) -> None:
        self.bar = None
        self.quiet = quiet  # other ranks of a distributed run print nothing
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, steps: int, **postfix: str) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def write(self, message: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class LogWindow:
    """Training numbers summed since the last log line."""

    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    extra: dict[str, float] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)

    def add(self, result: Any, world_size: int) -> None:
        """Add one optimiser step's StepResult (lmzoo.optim)."""
        self.loss += result.loss
        self.steps += 1
        self.tokens += result.tokens * world_size
        for key, value in result.metrics.items():
            self.extra[key] = self.extra.get(key, 0.0) + value

    def reset(self) -> None:
        self.loss, self.steps, self.tokens, self.extra = 0.0, 0, 0, {}
        self.restart_clock()

    def restart_clock(self) -> None:
        self.start = time.perf_counter()


def describe_metrics(metrics: Any) -> str:
    """`loss 1.2345, ppl 3.44, BLEU 12.3000` for the progress line, from lmzoo.tasks.Metrics."""
    names = {"bleu": "BLEU"}
    return ", ".join(
        f"{names.get(k, k)} {v:.2f}" if k == "ppl" else f"{names.get(k, k)} {v:.4f}"
        for k, v in metrics.values.items()
        if k != "tokens"
    )
