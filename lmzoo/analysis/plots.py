"""PNG figures, one function per plot: matplotlib's object API on the headless Agg canvas.

matplotlib is imported inside each function (and pyplot never), so `lmzoo --help` stays fast and no
global figure state or display is involved. Files are written atomically (lmzoo.io).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmzoo.io import atomic_write_bytes

if TYPE_CHECKING:
    from lmzoo.analysis.attention import AttentionMap
    from lmzoo.inference.scoring import Scored

SURPRISAL_CAP_BITS = 8.0  # surprisal at and above which a token gets the strongest shade
_SHADES = ((0.80, 0.93, 0.80), (0.99, 0.93, 0.62), (0.97, 0.60, 0.55))  # green -> yellow -> red
LABELLED_TOKENS = 480  # above this, the surprisal plot is a curve without token labels
TOKENS_PER_ROW = 60


def shade(fraction: float) -> tuple[float, float, float]:
    """RGB in 0..1 for a badness in 0..1: green (expected) -> yellow -> red (surprising)."""
    x = min(1.0, max(0.0, fraction)) * (len(_SHADES) - 1)
    low = min(int(x), len(_SHADES) - 2)
    t = x - low
    return tuple(a + (b - a) * t for a, b in zip(_SHADES[low], _SHADES[low + 1], strict=True))  # type: ignore[return-value]


def save_figure(figure: Any, path: str | Path, dpi: int = 110) -> Path:
    """Render a matplotlib Figure to PNG (its figsize x dpi pixels) and write it atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def surprisal_plot(scored: Scored, path: str | Path, title: str = "") -> Path:
    """Surprisal (-log2 p, bits) of every scored token along the text: labelled bars, one row per
    TOKENS_PER_ROW tokens; a plain curve for long texts."""
    from matplotlib.figure import Figure

    from lmzoo.analysis.attention import token_label

    bits = [-t.logprob / math.log(2) for t in scored.tokens]
    mean = sum(bits) / len(bits)
    headline = (
        f"loss {scored.loss:.3f} nats/token  ·  ppl {scored.ppl:.2f}  ·  {scored.bits_per_char:.3f} bits/char"
        f"  ·  {len(bits)} tokens"
    )
    if len(bits) > LABELLED_TOKENS:
        figure = Figure(figsize=(12, 3.5), layout="constrained")
        axes = figure.add_subplot()
        axes.plot(range(len(bits)), bits, linewidth=0.6, color="0.35")
        axes.axhline(mean, linestyle="--", color="tab:red", linewidth=1, label=f"mean {mean:.2f} bits")
        axes.set(xlabel="token", ylabel="surprisal (bits)", xlim=(0, len(bits)))
        axes.legend(loc="upper right")
    else:
        rows = math.ceil(len(bits) / TOKENS_PER_ROW)
        figure = Figure(
            figsize=(max(6.0, min(len(bits), TOKENS_PER_ROW) * 0.22 + 1.5), 2.3 * rows + 0.6),
            layout="constrained",
        )
        top = max(max(bits), mean) * 1.1
        for row in range(rows):
            axes = figure.add_subplot(rows, 1, row + 1)
            chunk = scored.tokens[row * TOKENS_PER_ROW : (row + 1) * TOKENS_PER_ROW]
            heights = bits[row * TOKENS_PER_ROW : (row + 1) * TOKENS_PER_ROW]
            colours = [shade(h / SURPRISAL_CAP_BITS) for h in heights]
            axes.bar(range(len(chunk)), heights, color=colours, edgecolor="0.4", linewidth=0.4, width=0.85)
            axes.axhline(mean, linestyle="--", color="tab:red", linewidth=0.8, label=f"mean {mean:.2f} bits")
            if row == 0:
                axes.legend(loc="upper right", fontsize=8, framealpha=0.8)
            labels = [token_label(t.text) for t in chunk]
            turn = 90 if any(len(label) > 2 for label in labels) else 0
            axes.set_xticks(range(len(chunk)), labels, rotation=turn, fontsize=8, fontfamily="monospace")
            axes.set(xlim=(-0.6, TOKENS_PER_ROW - 0.4 if rows > 1 else len(chunk) - 0.4), ylim=(0, top))
            axes.set_ylabel("surprisal (bits)", fontsize=8)
            axes.tick_params(axis="y", labelsize=8)
    figure.suptitle(f"{title}\n{headline}" if title else headline, fontsize=10)
    return save_figure(figure, path)


def attention_grid(maps: list[AttentionMap], path: str | Path, title: str = "") -> Path:
    """Heat maps of attention weights: one row per attention module, one column per head."""
    from matplotlib.figure import Figure

    columns = max(len(m.heads or []) for m in maps)
    longest = max(max(len(m.queries), len(m.keys)) for m in maps)
    cell = min(9.0, max(2.6, 0.16 * longest + 1.2))
    figure = Figure(figsize=(cell * columns + 1.0, cell * len(maps) + 0.5), layout="constrained")
    grid = figure.subplots(len(maps), columns, squeeze=False)
    labelled = longest <= 64
    image = None
    for row, item in enumerate(maps):
        for column in range(columns):
            axes = grid[row][column]
            if column >= len(item.heads or []):
                axes.set_axis_off()
                continue
            image = axes.imshow(item.weights[column].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            axes.set_title(f"{item.name} · head {(item.heads or [])[column]}", fontsize=8)
            if labelled:
                size = 8 if longest <= 32 else 6
                turn = 90 if any(len(key) > 2 for key in item.keys) else 0
                axes.set_xticks(
                    range(len(item.keys)), item.keys, rotation=turn, fontsize=size, fontfamily="monospace"
                )
                axes.set_yticks(range(len(item.queries)), item.queries, fontsize=size, fontfamily="monospace")
            axes.set_xlabel("attends to", fontsize=7)
    if image is not None:
        figure.colorbar(image, ax=grid, shrink=0.6, label="attention weight")
    if title:
        figure.suptitle(title, fontsize=10)
    return save_figure(figure, path)


def png_bytes(figure: Any, dpi: int = 100) -> bytes:
    """A Figure as PNG bytes of exactly figsize x dpi pixels (no tight cropping: sizes are predictable)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def compare_curves(runs: list[dict[str, Any]], path: str | Path, title: str = "", dpi: int = 100) -> Path:
    """Validation loss against tokens seen (left) and against training wall time (right), one colour per
    model; `runs` items: label, tokens, seconds (None where unknown), loss. 1100 x 420 pixels at dpi 100."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    by_tokens, by_time = figure.subplots(1, 2)
    colours: dict[str, Any] = {}
    for run in runs:
        label = run["label"]
        first = label not in colours
        colour = colours.setdefault(label, f"C{len(colours) % 10}")
        style = {"color": colour, "marker": "o", "markersize": 3, "linewidth": 1.4}
        by_tokens.plot(run["tokens"], run["loss"], label=label if first else None, **style)
        timed = [(t, v) for t, v in zip(run["seconds"], run["loss"], strict=True) if t is not None]
        if timed:
            by_time.plot([t for t, _ in timed], [v for _, v in timed], **style)
    by_tokens.set(xlabel="tokens seen", ylabel="validation loss (nats/token)")
    by_time.set(xlabel="training wall time (s)", ylabel="validation loss (nats/token)")
    for axes in (by_tokens, by_time):
        axes.grid(alpha=0.3)
    by_tokens.legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    atomic_write_bytes(Path(path), png_bytes(figure, dpi))
    return Path(path)


def metric_panels(panels: list[dict[str, Any]], resumes: list[int], dpi: int = 100) -> bytes:
    """Training curves in a two-column grid, each panel 5 x 3 inches, a dashed line at each resume.
    `panels` items: title, ylabel, series [(label, steps, values)], optional log (log-scale y)."""
    from matplotlib.figure import Figure

    rows = max(1, math.ceil(len(panels) / 2))
    figure = Figure(figsize=(10, 3 * rows), layout="constrained")
    grid = figure.subplots(rows, 2, squeeze=False)
    for index, axes in enumerate(ax for row in grid for ax in row):
        if index >= len(panels):
            axes.set_axis_off()
            continue
        panel = panels[index]
        for name, steps, values in panel["series"]:
            axes.plot(steps, values, label=name, linewidth=1.2, marker="o" if len(steps) < 30 else None)
        for number, step in enumerate(resumes):
            label = "resumed" if number == 0 else None
            axes.axvline(step, color="0.4", linestyle="--", linewidth=0.9, label=label)
        if panel.get("log"):
            axes.set_yscale("log")
        axes.set(title=panel["title"], xlabel="step", ylabel=panel.get("ylabel", ""))
        axes.grid(alpha=0.3)
        if len(panel["series"]) > 1 or resumes:
            axes.legend(fontsize=8)
    return png_bytes(figure, dpi)
