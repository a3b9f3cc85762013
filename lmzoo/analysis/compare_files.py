"""What `lmzoo compare` writes: the table (Markdown, CSV, JSON), the config diff and what was held
equal, validation curves (PNG) and the same prompt sampled from every model, side by side.

    <out>/compare.md    table sorted by bits per character, held-equal line, config diff, samples
    <out>/compare.csv   the table, one row per config (with --seeds K: mean and standard deviation)
    <out>/compare.json  everything above, and every run's own row
    <out>/compare.png   validation loss against tokens seen and against training wall time
"""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path
from typing import Any

from lmzoo.analysis.compare import EVALS_PER_RUN, NUMERIC, Comparison, aggregate
from lmzoo.io import atomic_write_text
from lmzoo.training.tracking import flatten_config

COLUMNS = {  # key: (header, format)
    "params": ("params", "{:,.0f}"),
    "non_embedding_params": ("non-emb params", "{:,.0f}"),
    "tokens": ("tokens seen", "{:,.0f}"),
    "val_loss_best": ("val loss best", "{:.4f}"),
    "val_loss_final": ("val loss final", "{:.4f}"),
    "val_ppl": ("val ppl", "{:.2f}"),
    "val_bpc": ("val bits/char", "{:.3f}"),
    "gap": ("val−train gap", "{:+.3f}"),
    "tokens_per_sec": ("tokens/s", "{:,.0f}"),
    "wall_seconds": ("wall time (s)", "{:,.0f}"),
    "peak_memory_mb": ("peak memory (MB)", "{:,.0f}"),
}
UNSHOWN_KEYS = ("name", "out_dir", "seed")  # differ by construction or are stated in the held-equal line
TRAINING_SECTIONS = ("data", "tokenizer", "model", "train")  # equal keys listed (sampling settings are not)


def sample_all(
    comparison: Comparison, *, prompt: str | None, max_new_tokens: int, device: str = "cpu", seed: int = 0
) -> None:
    """Sample the same prompt, with the same seed and settings, from each config's first-seed run."""
    from lmzoo.run import Run

    firsts = {r.planned.label: r for r in reversed(comparison.results)}
    first = comparison.results[0].planned.config
    comparison.prompt = prompt if prompt is not None else (first.sample.prompt or "\n")
    for label in dict.fromkeys(r.planned.label for r in comparison.results):
        run = Run.open(firsts[label].run_dir)
        pieces = run.generate(
            comparison.prompt, device=device, seed=seed, max_new_tokens=max_new_tokens, temperature=0.8
        )
        comparison.samples[label] = comparison.prompt + "".join(pieces)


def config_diff(comparison: Comparison) -> tuple[list[tuple[str, dict[str, str]]], list[str]]:
    """(keys whose values differ between the configs with each config's value, keys that are equal)."""
    flat: dict[str, dict[str, str]] = {}
    for result in comparison.results:
        flat.setdefault(result.planned.label, flatten_config(result.planned.config.to_dict()))
    keys = sorted({k for values in flat.values() for k in values if not k.startswith(UNSHOWN_KEYS)})
    differing, equal = [], []
    for key in keys:
        values = {label: _show(config.get(key, "—")) for label, config in flat.items()}
        if len(set(values.values())) > 1:
            differing.append((key, values))
        else:
            equal.append(key)
    return differing, equal


def held_equal(comparison: Comparison, equal_keys: list[str]) -> str:
    """One line: what every run shares."""
    validation, seeds = comparison.validation, comparison.seeds
    devices = {r.row["device"] for r in comparison.results}
    parts = [
        f"the validation text ({validation['characters']:,} characters, sha256 {validation['sha256'][:12]}…)",
        "the training text"
        if validation["same_training_text"]
        else "NOT the training text (data.train differs)",
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}",
        f"the token budget ({comparison.tokens:,} tokens; each run within half a batch of it)",
        f"evaluation over the whole validation split at every {100 // EVALS_PER_RUN}% of the budget",
    ]
    if len(devices) == 1:
        parts.append(f"the device ({devices.pop()})")
    listed = ", ".join(f"`{k}`" for k in equal_keys if k.split(".")[0] in TRAINING_SECTIONS)
    return f"Held equal: {', '.join(parts)}; and these config keys: {listed}."


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def cell(value: dict[str, Any], key: str, seeds: int) -> str:
    """A table cell: the mean, and with more than one seed `± spread` in the same format."""
    fmt = COLUMNS[key][1]
    text = fmt.format(value["mean"])
    return f"{text} ± {fmt.format(value['spread']).lstrip('+')}" if seeds > 1 else text


def table_markdown(rows: list[dict[str, Any]], seeds: int) -> str:
    headers = ["model", "family", *(COLUMNS[k][0] for k in NUMERIC), "device"]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * len(NUMERIC) + ["---"]) + "|",
    ]
    for row in rows:
        cells = [row["model"], row["family"], *(cell(row[k], k, seeds) for k in NUMERIC), row["device"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["model", "family", "device", "seeds", *(f"{k}{s}" for k in NUMERIC for s in ("", "_std"))]
    )
    for row in rows:
        numbers = [f"{row[k][part]:.6g}" for k in NUMERIC for part in ("mean", "spread")]
        writer.writerow([row["model"], row["family"], row["device"], len(row["seeds"]), *numbers])
    return buffer.getvalue()


def samples_markdown(comparison: Comparison) -> str:
    """The samples as one Markdown table row, one column per model (HTML line breaks inside cells)."""
    labels = list(comparison.samples)
    cells = [
        html.escape(comparison.samples[label]).replace("|", "&#124;").replace("\n", "<br>")
        for label in labels
    ]
    return "| " + " | ".join(labels) + " |\n|" + "---|" * len(labels) + "\n| " + " | ".join(cells) + " |\n"


def document(comparison: Comparison, rows: list[dict[str, Any]], png: str) -> str:
    differing, equal = config_diff(comparison)
    seeds = len(comparison.seeds)
    spread = " (mean ± standard deviation over the seeds)" if seeds > 1 else ""
    diff = (
        ["| key | " + " | ".join(differing[0][1]) + " |", "|---|" + "---|" * len(differing[0][1])]
        if differing
        else []
    )
    diff += [
        f"| `{key}` | " + " | ".join(f"`{v}`" for v in values.values()) + " |" for key, values in differing
    ]
    return "\n".join(
        [
            f"# lmzoo compare: {comparison.tokens:,} tokens per run",
            "",
            f"Sorted by validation bits per character{spread}. val−train gap = final validation loss minus "
            "final training loss; tokens/s = median training throughput (evaluation excluded); wall time and "
            "peak memory measured around each training call.",
            "",
            table_markdown(rows, seeds),
            held_equal(comparison, equal),
            "",
            "## What differs",
            "",
            *diff,
            "",
            f"![validation loss]({png})",
            "",
            f"## The same prompt ({comparison.prompt!r}), seed 0, temperature 0.8",
            "",
            samples_markdown(comparison) if comparison.samples else "(no samples)",
        ]
    )


def write_outputs(comparison: Comparison, out: str | Path) -> list[Path]:
    """compare.md, compare.csv, compare.json and compare.png under `out`."""
    from lmzoo.analysis.plots import compare_curves

    out = Path(out)
    rows = aggregate(comparison.results)
    curves = [
        {"label": r.planned.label, "tokens": r.curve_tokens, "seconds": r.curve_seconds, "loss": r.curve_loss}
        for r in comparison.results
    ]
    title = f"{len(rows)} configs, {comparison.tokens:,} tokens each, seed(s) {', '.join(map(str, comparison.seeds))}"
    png = compare_curves(curves, out / "compare.png", title=title)
    differing, equal = config_diff(comparison)
    payload = {
        "tokens": comparison.tokens,
        "seeds": comparison.seeds,
        "validation": comparison.validation,
        "held_equal": held_equal(comparison, equal),
        "differs": {key: values for key, values in differing},
        "table": rows,
        "runs": [{**r.row, "reused": r.reused} for r in comparison.results],
        "prompt": comparison.prompt,
        "samples": comparison.samples,
    }
    files = {
        out / "compare.md": document(comparison, rows, png.name),
        out / "compare.csv": table_csv(rows),
        out / "compare.json": json.dumps(payload, indent=2, default=str) + "\n",
    }
    for path, text in files.items():
        atomic_write_text(path, text)
    return [*files, png]
