"""Where training numbers go: TensorBoard, metrics.jsonl and the progress bar.

Keys are stable and grouped: train/loss, train/lr, train/grad_norm, train/epoch (and DPO's
train/rewards_*), val/loss, val/ppl (val/bleu), perf/tokens_per_sec. They land in metrics.jsonl, one
JSON object per logged step with its wall-clock `time`, for scripts to read. TensorBoard gets the same
numbers under the same tags, except the two losses: `loss/train` and `loss/val`, a group that sorts
first, so its first screen is the loss curves; a custom-scalars layout also draws both on one chart.
Each training segment (the start, and every resume) opens with one `event` record (start or resume)
holding the run's facts: parameter counts, global batch, device, hardware and versions. TensorBoard
gets those and the resolved config once, as text (and the config as hparams), instead of one-point
charts. `read_history` stitches the segments.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmzoo.io import atomic_write_text

# TensorBoard's name for a metrics.jsonl key, where they differ: TensorBoard sorts its groups by name, and
# `loss` comes before `perf`, `train` and `val`.
TENSORBOARD_TAGS = {"train/loss": "loss/train", "val/loss": "loss/val"}
# The CUSTOM SCALARS tab: train and val loss on one chart.
LAYOUT = {"loss": {"train and val loss": ["Multiline", ["^loss/train$", "^loss/val$"]]}}


def tensorboard_tag(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key."""
    return TENSORBOARD_TAGS.get(key, key)


class Tracker:
    """Writes scalars and text to TensorBoard and metrics.jsonl.

    On resume from step N, records after N (written by the run before it stopped, after its last
    checkpoint) are dropped from both, so the curves show one consistent history.
    """

    def __init__(self, log_dir: Path, metrics_path: Path, *, resume_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = log_dir
        self.metrics_path = metrics_path
        if resume_step is not None:
            self._truncate_metrics(resume_step)
        # TensorBoard drops events at steps >= purge_step; step `resume_step` itself is kept, as in metrics.jsonl.
        purge_step = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        self.writer.add_custom_scalars(LAYOUT)
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

    def begin(self, step: int, *, resumed: bool, config: dict[str, Any], facts: dict[str, Any]) -> None:
        """Open a training segment at `step`: an `event` record (start or resume) with `facts` in
        metrics.jsonl; in TensorBoard the facts and the resolved config as text, and (at the start)
        the config as hparams, so no one-point scalar charts crowd the first screen."""
        record = {"step": step, "event": "resume" if resumed else "start", "time": time.time(), **facts}
        self._write(record)
        lines = [f"{key}: {value}" for key, value in facts.items()]
        self.text(step, "run/facts", "\n".join(lines))
        import yaml

        self.text(step, "run/config", yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        if not resumed:
            self._hparams(config, facts)

    def _hparams(self, config: dict[str, Any], facts: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        flat = {k: v for k, v in flatten_config(config).items() if v is not None}
        values = {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in flat.items()}
        values.update({k: v for k, v in facts.items() if k.startswith("params/")})
        for summary in hparams(values, {tensorboard_tag("val/loss"): 0.0}):
            self.writer._get_file_writer().add_summary(summary)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tensorboard_tag(tag), value, step)
        values = {k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}
        self._write({"step": step, **values, "time": time.time()})

    def _write(self, record: dict[str, Any]) -> None:
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        # TensorBoard renders markdown: indent by four spaces so line breaks survive.
        self.writer.add_text(tag, "    " + text.replace("\n", "\n    "), step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
        self.metrics_file.close()


def flatten_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {"section.key": value}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def environment(device: Any, precision: str) -> dict[str, Any]:
    """Hardware and versions a run records at each start/resume (strings, for reports)."""
    import torch

    from lmzoo import __version__

    facts: dict[str, Any] = {
        "device": str(device),
        "precision": precision,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count() or 0,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "lmzoo": __version__,
        "platform": platform.platform(terse=True),
    }
    if getattr(device, "type", "") == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
        """Add one optimiser step's StepResult (lmzoo.training.optim)."""
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
    """`loss 1.2345, ppl 3.44, BLEU 12.3000` for the progress line, from lmzoo.training.tasks.Metrics."""
    names = {"bleu": "BLEU"}
    return ", ".join(
        f"{names.get(k, k)} {v:.2f}" if k == "ppl" else f"{names.get(k, k)} {v:.4f}"
        for k, v in metrics.values.items()
        if k != "tokens"
    )
