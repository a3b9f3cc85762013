"""`lmzoo report RUN`: one self-contained HTML (or Markdown) file about a run, built only from what the run
wrote: metrics.jsonl, config.yaml, checkpoints, the TensorBoard samples. Nothing is re-trained.

The HTML has its figures inline as base64 PNGs, inline CSS, no JavaScript and no links to fetch, so it
opens offline. A resumed run reads as one history: metrics.jsonl was cut at the resume step, so every
step appears once, and the start/resume records (lmzoo.training.tracking) mark where each segment began.
"""

from __future__ import annotations

import base64
import datetime
import html
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmzoo.errors import CheckpointError, LmzooError
from lmzoo.io import atomic_write_text

if TYPE_CHECKING:
    from lmzoo.run import Run

KNOWN = {"loss", "lr", "grad_norm", "tokens_per_sec", "ppl", "epoch"}  # tags with their own panels (or none)


@dataclass
class Report:
    """Everything a report shows, as plain values; rendered by `to_html` / `to_markdown`."""

    name: str  # the run directory's name
    title: str
    summary: list[tuple[str, str]]
    figure: bytes  # PNG: loss, lr, gradient norm, tokens/s and any BLEU / DPO reward curves
    config_yaml: str
    parameters: list[tuple[str, int]]
    samples: list[tuple[str, str]]  # (where it came from, text)
    environment: list[dict[str, Any]]  # one row per training segment
    segments: list[str]


def build_report(where: str | Path | None, runs_dir: str | Path = "runs") -> Report:
    """Read a run directory into a Report; CheckpointError when it has no metrics to report."""
    from lmzoo.analysis.plots import metric_panels
    from lmzoo.run import Run

    run = Run.open(where, runs_dir=runs_dir)
    history = run.history()
    if not history.records:
        raise CheckpointError(
            f"{run.path} has no metrics (metrics.jsonl is missing or empty); nothing to report"
        )
    return Report(
        name=run.name,
        title=f"lmzoo report: {run.name} ({run.config.model.name})",
        summary=summary_rows(run, history),
        figure=metric_panels(panels(history), history.resume_steps),
        config_yaml=run.config_text(),
        parameters=parameters_by_module(run),
        samples=samples(run),
        environment=[{"event": m["event"], "step": m["step"], **_environment(m)} for m in history.markers],
        segments=[
            f"{s.event} at step {s.first_step}, trained to step {s.last_step} in {_duration(s.seconds)}"
            for s in history.segments
        ],
    )


def panels(history: Any) -> list[dict[str, Any]]:
    """Loss (train and validation together), learning rate, gradient norm, tokens/s, then one panel per
    other logged quantity (BLEU, DPO rewards, ...) with its train/ and val/ series together."""

    def series(*tags: str) -> list[tuple[str, list[int], list[float]]]:
        found = [(tag, *history.series(tag)[:2]) for tag in tags]
        return [(tag, steps, values) for tag, steps, values in found if steps]

    chosen: list[dict[str, Any]] = [
        {"title": "loss (nats/token)", "series": series("train/loss", "val/loss")},
        {"title": "learning rate", "series": series("train/lr")},
        {"title": "gradient norm (before clipping)", "series": series("train/grad_norm"), "log": True},
        {"title": "training tokens/s", "series": series("perf/tokens_per_sec")},
    ]
    others = sorted({t.split("/", 1)[1] for t in history.tags() if "/" in t} - KNOWN)
    chosen += [
        {"title": name.replace("_", " "), "series": series(f"train/{name}", f"val/{name}")} for name in others
    ]
    return [panel for panel in chosen if panel["series"]]


def summary_rows(run: Any, history: Any) -> list[tuple[str, str]]:
    """Best step and validation scores, bits per character where computable, tokens, steps, wall time."""
    rows = [("model", f"{run.config.model.name} ({run.kind})"), ("run directory", str(run.path))]
    steps, losses, _ = history.series("val/loss")
    info = _best_info(run)
    if losses:
        best = min(range(len(losses)), key=losses.__getitem__)
        best_step, best_loss = info.get("step", steps[best]), info.get("val_loss", losses[best])
        rows += [("best step", str(best_step)), ("best validation loss", f"{best_loss:.4f}")]
        rows += [("best validation perplexity", f"{math.exp(min(best_loss, 50.0)):.2f}")]
        rows.append(("best validation bits/char", _bits_per_char(run, best_loss)))
    for tag, label in (("val/bleu", "best validation BLEU"), ("val/reward_accuracy", "best reward accuracy")):
        values = history.series(tag)[1]
        if values:
            rows.append((label, f"{max(values):.4f}"))
    train_losses = history.series("train/loss")[1]
    if train_losses:
        rows.append(("final training loss", f"{train_losses[-1]:.4f}"))
    rows += [("steps", str(max(r["step"] for r in history.records))), ("tokens seen", _tokens_seen(run))]
    speeds = history.series("perf/tokens_per_sec")[1]
    if speeds:
        rows.append(("training tokens/s (median)", f"{statistics.median(speeds):,.0f}"))
    wall = history.wall_seconds
    rows.append(("training wall time", _duration(wall) if wall is not None else "not recorded"))
    if history.resume_steps:
        rows.append(("resumed at step", ", ".join(map(str, history.resume_steps))))
    return rows


def _best_info(run: Any) -> dict[str, Any]:
    try:
        return run.info("best")
    except LmzooError:
        return {}


def _bits_per_char(run: Any, loss: float) -> str:
    """Bits per character of the validation text the run's evaluation covered (text language models whose
    corpus is still on disk)."""
    from lmzoo.analysis.compare import bits_per_char, eval_coverage

    if run.kind != "lm" or run.config.data.format != "text":
        return "n/a (not a text language model)"
    try:
        tokens, characters = eval_coverage(run)
    except LmzooError as err:
        return f"n/a ({err})"
    return f"{bits_per_char(loss, tokens, characters):.4f} ({tokens:,} tokens over {characters:,} characters)"


def _tokens_seen(run: Run) -> str:
    try:
        seen = run.tokens_seen("last")
    except LmzooError:
        seen = None
    return "not recorded" if seen is None else f"{seen:,}"


def parameters_by_module(run: Any) -> list[tuple[str, int]]:
    """Distinct parameters per top-level module of the best checkpoint's model (a tied weight counts in the
    first module that holds it), then the total."""
    try:
        model = run.model("best", "cpu")
    except LmzooError:
        return []
    seen: set[int] = set()
    rows = []
    for name, module in model.named_children():
        fresh = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in fresh)
        if fresh:  # parameter-free modules (dropout, activations) are left out
            rows.append((name, sum(p.numel() for p in fresh)))
    loose = [p for p in model.parameters() if id(p) not in seen]
    if loose:
        rows.append(("(own parameters)", sum(p.numel() for p in loose)))
    return [*rows, ("total", sum(count for _, count in rows))]


def samples(run: Any, keep: int = 2) -> list[tuple[str, str]]:
    """The last `keep` samples training logged to TensorBoard; else one generated now (seed 0)."""
    logged = _logged_samples(run.path)[-keep:]
    if logged:
        return [(f"logged at step {step}", text) for step, text in logged]
    prompt = run.config.sample.prompt
    try:
        text = "".join(run.generate(prompt or "\n", device="cpu", seed=0, max_new_tokens=120))
    except LmzooError as err:
        return [("no sample", str(err))]
    return [("generated for this report (seed 0, 120 tokens)", (prompt or "") + text)]


def _logged_samples(run_dir: Path) -> list[tuple[int, str]]:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return []
    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    if "sample/text_summary" not in events.Tags().get("tensors", []):
        return []
    found = []
    for event in events.Tensors("sample/text_summary"):
        text = event.tensor_proto.string_val[0].decode("utf-8", "replace")
        found.append((event.step, "\n".join(line.removeprefix("    ") for line in text.split("\n"))))
    return found


def _environment(marker: dict[str, Any]) -> dict[str, Any]:
    keys = ("device", "precision", "gpu", "cpu", "cpu_count", "torch", "python", "lmzoo", "platform")
    return {k: marker[k] for k in keys if k in marker}


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs} s" if minutes else f"{seconds:.1f} s"


# ---- rendering -------------------------------------------------------------------------------------

STYLE = (
    "body{font-family:sans-serif;max-width:1080px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
    "td.n{text-align:right;font-variant-numeric:tabular-nums}pre{background:#f6f6f6;padding:.6em;overflow-x:auto}"
    "img{max-width:100%}"
)


def _html_table(rows: list[list[Any]], header: list[str] | None = None) -> str:
    def td(value: Any) -> str:
        numeric = isinstance(value, (int, float))
        text = f"{value:,}" if isinstance(value, int) else str(value)
        return f"<td{' class=n' if numeric else ''}>{html.escape(text)}</td>"

    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    return "<table>" + head + "".join("<tr>" + "".join(map(td, row)) + "</tr>" for row in rows) + "</table>"


def _environment_rows(report: Report) -> tuple[list[str], list[list[Any]]]:
    keys = list(dict.fromkeys(k for row in report.environment for k in row))
    return keys, [[row.get(k, "") for k in keys] for row in report.environment]


def to_html(report: Report) -> str:
    """A standalone HTML page: inline CSS, figures as data: URIs, no scripts, nothing to fetch."""
    image = base64.b64encode(report.figure).decode("ascii")
    keys, env = _environment_rows(report)
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(report.title)}</title>",
        f"<style>{STYLE}</style></head><body><h1>{html.escape(report.title)}</h1>",
        "<h2>Summary</h2>" + _html_table([list(r) for r in report.summary]),
        f"<h2>Training curves</h2><img alt='training curves' src='data:image/png;base64,{image}'>",
        "<h2>Segments</h2><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in report.segments) + "</ul>",
        "<h2>Parameters per module</h2>"
        + _html_table([list(r) for r in report.parameters], ["module", "params"]),
        "<h2>Samples</h2>"
        + "".join(f"<h3>{html.escape(w)}</h3><pre>{html.escape(t)}</pre>" for w, t in report.samples),
        f"<h2>Config</h2><pre>{html.escape(report.config_yaml)}</pre>",
        "<h2>Hardware and versions</h2>" + (_html_table(env, keys) if env else "<p>not recorded</p>"),
        f"<p><small>{html.escape(_footer())}</small></p></body></html>",
    ]
    return "\n".join(parts) + "\n"


def _md_table(rows: list[list[Any]], header: list[str]) -> str:
    def cell(value: Any) -> str:
        return (f"{value:,}" if isinstance(value, int) else str(value)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows]) + "\n"


def to_markdown(report: Report) -> str:
    """The same report as Markdown, the figure inline as a data: URI."""
    image = base64.b64encode(report.figure).decode("ascii")
    keys, env = _environment_rows(report)
    sample_blocks = [f"### {where}\n\n```\n{text}\n```\n" for where, text in report.samples]
    parts = [
        f"# {report.title}\n",
        "## Summary\n\n" + _md_table([list(r) for r in report.summary], ["", "value"]),
        f"## Training curves\n\n![training curves](data:image/png;base64,{image})\n",
        "## Segments\n\n" + "".join(f"- {s}\n" for s in report.segments),
        "## Parameters per module\n\n"
        + _md_table([list(r) for r in report.parameters], ["module", "params"]),
        "## Samples\n\n" + "\n".join(sample_blocks),
        f"## Config\n\n```yaml\n{report.config_yaml}```\n",
        "## Hardware and versions\n\n" + (_md_table(env, keys) if env else "not recorded\n"),
        f"_{_footer()}_\n",
    ]
    return "\n".join(parts)


def _footer() -> str:
    from lmzoo import __version__

    return f"written by lmzoo {__version__} on {datetime.date.today().isoformat()} from the run's own files"


def write_report(where: str | Path | None, *, fmt: str = "html", out: str | Path | None = None) -> Path:
    """Build the report of a run and write it (default: report-<run name>.<html|md> here)."""
    from lmzoo.errors import ConfigError

    if fmt not in ("html", "md"):
        raise ConfigError(f"fmt must be html or md, got {fmt!r}", param="fmt")
    report = build_report(where)
    path = Path(out) if out is not None else Path(f"report-{report.name}.{fmt}")
    atomic_write_text(path, to_html(report) if fmt == "html" else to_markdown(report))
    return path
