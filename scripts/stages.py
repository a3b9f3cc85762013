"""The training stages end to end, measured: pre-train -> SFT -> reward model -> PPO / GRPO / DPO.

    lmzoo suite --out data/suite                         # the instruction suite (once)
    python scripts/stages.py run --seed 1                # every stage of seed 1, in order
    python scripts/stages.py run --seed 1 --stages ppo   # one stage (the ones before it must exist)
    python scripts/stages.py run --seed 1 --stages reward --eval-only   # evaluate a trained stage again
    python scripts/stages.py table                       # docs/stages.md's table and docs/stages.png

Each stage is `lmzoo train configs/stages/<stage>.yaml` with out_dir, seed and init_from set for the
seed (runs under runs/stages-seed<N>/), timed on the wall clock, then evaluated on the held-out test
prompts with `lmzoo eval --instructions data/suite/test.jsonl --reference <the SFT run> --json` (the
reward model: `lmzoo eval --pairs data/suite/pairs_test.jsonl --json`). Results accumulate in
runs/stages-seed<N>/results.json; `table` reads every seed's file. Prefix each `run` with
`flock /tmp/lmzoo-cpu.lock` on a shared machine; a stage is resumable (`lmzoo train ... --resume`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("pretrain", "sft", "reward", "ppo", "grpo", "dpo")
START = {"sft": "pretrain", "reward": "sft", "ppo": "sft", "grpo": "sft", "dpo": "sft"}  # init_from
SUITE = Path("data/suite")
ARITHMETIC = ("add", "subtract")


def run_dir(out: Path, stage: str) -> Path:
    return out / f"stages_{stage}"


def train_command(stage: str, seed: int, out: Path) -> list[str]:
    command = [
        "lmzoo",
        "train",
        str(ROOT / "configs" / "stages" / f"{stage}.yaml"),
        f"out_dir={out}",
        f"seed={seed}",
    ]
    if stage in START:
        command.append(f"init_from={run_dir(out, START[stage])}")
    if stage == "ppo":
        command.append(f"rl.reward_run={run_dir(out, 'reward')}")
    return command + ["--no-progress"]


def evaluate(stage: str, out: Path, suite: Path) -> dict:
    if stage == "reward":
        command = [
            "lmzoo",
            "eval",
            "--run",
            str(run_dir(out, stage)),
            "--pairs",
            str(suite / "pairs_test.jsonl"),
        ]
    else:
        command = [
            "lmzoo",
            "eval",
            "--run",
            str(run_dir(out, stage)),
            "--instructions",
            str(suite / "test.jsonl"),
        ]
        if stage != "pretrain":
            command += ["--reference", str(run_dir(out, "sft"))]
    done = subprocess.run(command + ["--json", "--device", "cpu"], check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def run_stages(seed: int, stages: list[str], suite: Path, *, train: bool = True) -> None:
    """Train (unless `train` is False: evaluate the trained runs again) and evaluate each stage."""
    out = Path("runs") / f"stages-seed{seed}"
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for stage in stages:
        command = train_command(stage, seed, out)
        if train:
            print("$", " ".join(command), file=sys.stderr, flush=True)
            start = time.perf_counter()
            subprocess.run(command, check=True)
            wall = time.perf_counter() - start
        else:
            wall = results[stage]["wall_s"]
        scores = evaluate(stage, out, suite)
        results[stage] = {"seed": seed, "wall_s": wall, "command": " ".join(command[:3]), "eval": scores}
        out.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{stage}: {wall / 60:.1f} min; {summary(stage, scores)}", file=sys.stderr, flush=True)


def arithmetic(scores: dict) -> float:
    tasks = scores["tasks"]
    return sum(tasks[t]["exact_match"] * tasks[t]["count"] for t in ARITHMETIC) / sum(
        tasks[t]["count"] for t in ARITHMETIC
    )


def summary(stage: str, scores: dict) -> str:
    if stage == "reward":
        return f"held-out pair accuracy {scores['reward_accuracy']:.1%}"
    return (
        f"exact match {scores['exact_match']:.1%}, arithmetic {arithmetic(scores):.1%}, "
        f"style {scores['style_rate']:.1%}, KL {scores['kl'] or 0:.2f}"
    )


def table(paths: list[Path], plot: Path | None) -> None:
    """The markdown table of every seed's results (each cell: the seeds' values in seed order, joined by
    " / "), and the plot."""
    seeds = {int(p.parent.name.removeprefix("stages-seed")): json.loads(p.read_text()) for p in paths}
    order = sorted(seeds)
    names = ("exact match", "arithmetic", "style", "KL to SFT", "wall time")
    print(f"Seeds {' / '.join(map(str, order))}.\n")
    print("| stage | " + " | ".join(names) + " |")
    print("|---" + "|---:" * len(names) + "|")
    for stage in STAGES:
        if not any(stage in seeds[s] for s in order):
            continue
        cells = [
            " / ".join(_cell(stage, metric, seeds[s].get(stage)) or "–" for s in order)
            for metric in ("exact_match", "arithmetic", "style_rate", "kl", "wall")
        ]
        print(f"| {stage} | " + " | ".join(cells) + " |")
    if plot is not None:
        _plot(seeds, plot)


def _cell(stage: str, metric: str, result: dict | None) -> str:
    if result is None:
        return ""
    scores = result["eval"]
    if metric == "wall":
        return f"{result['wall_s'] / 60:.1f} min"
    if stage == "reward":
        return f"pairs {scores['reward_accuracy']:.1%}" if metric == "exact_match" else ""
    if metric == "kl":
        return "" if scores.get("kl") is None else f"{scores['kl']:.2f}"
    value = arithmetic(scores) if metric == "arithmetic" else scores[metric]
    return f"{value:.1%}"


def _plot(seeds: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in STAGES if s != "reward" and any(s in r for r in seeds.values())]
    metrics = {"exact match": "exact_match", "arithmetic": "arithmetic", "style rate": "style_rate"}
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(metrics)
    for index, (label, key) in enumerate(metrics.items()):
        values = []
        for stage in stages:
            found = [r[stage]["eval"] for r in seeds.values() if stage in r]
            values.append([arithmetic(f) if key == "arithmetic" else f[key] for f in found])
        xs = [i + (index - 1) * width for i in range(len(stages))]
        ax.bar(xs, [100 * sum(v) / len(v) for v in values], width, label=label)
        for x, v in zip(xs, values, strict=True):
            ax.scatter([x] * len(v), [100 * y for y in v], color="black", s=8, zorder=3)
    ax.set_xticks(range(len(stages)), stages)
    ax.set_ylabel("held-out %")
    ax.set_ylim(0, 105)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("after each stage (bars: mean of the seeds, dots: each seed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate stages for one seed")
    run.add_argument("--seed", type=int, default=1)
    run.add_argument("--stages", default=",".join(STAGES), help="comma-separated, in order")
    run.add_argument("--suite", type=Path, default=SUITE)
    run.add_argument("--eval-only", action="store_true", help="evaluate the stages' trained runs again")
    show = sub.add_parser("table", help="the stages table (markdown) and plot from runs/stages-seed*/")
    show.add_argument("--plot", type=Path, default=ROOT / "docs" / "stages.png")
    args = parser.parse_args()
    if args.command == "run":
        stages = [s for s in args.stages.split(",") if s]
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            parser.error(f"unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}")
        run_stages(args.seed, stages, args.suite, train=not args.eval_only)
    else:
        table(sorted(Path("runs").glob("stages-seed*/results.json")), args.plot)


if __name__ == "__main__":
    main()
