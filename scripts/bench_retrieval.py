"""Retrieval benchmarks: kNN-LM datastore build cost, query cost per generated token, loss with retrieval.

    python scripts/bench_retrieval.py --run runs/gpt                       # Tiny Shakespeare store, its val split
    python scripts/bench_retrieval.py --run runs/gpt --data lmzoo:tatoeba_deu_eng/train.en \\
        --eval lmzoo:tatoeba_deu_eng/valid.en --tune                       # domain adaptation
    python scripts/bench_retrieval.py --run runs/lstm --store stores/x     # reuse a built store

Each row sets the retrieval figure beside its baseline measured in the same process: the build beside
one plain forward pass over the same text, generation with the store beside generation without it
(timed in alternation, A B A B, so the ratio holds on a busy machine), loss with the store beside the
plain model's loss on the same tokens. Markdown on stdout; --json FILE also writes the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmzoo.data.prepare import split_text  # noqa: E402
from lmzoo.retrieval.interpolate import with_knn  # noqa: E402
from lmzoo.retrieval.knn import build_datastore, read_manifest  # noqa: E402
from lmzoo.retrieval.knn_eval import evaluate_knn, evaluate_tokens  # noqa: E402
from lmzoo.run import Run  # noqa: E402

CPU = torch.device("cpu")


def row_build(
    run: Run, data: list[str], store: Path | None, workdir: Path, batch_size: int | None = None
) -> tuple[dict, Path]:
    """Build the store (unless given) and time a plain forward pass over the same text beside it."""
    forward = evaluate_tokens(run, run.prepared(data).tensor("train"), device=CPU)
    if store is None:
        store = workdir / "store"
        build_datastore(run, data, store, device=CPU, batch_size=batch_size)
    manifest = read_manifest(store)
    per_million = 1e6 / manifest["size"]
    return {
        "keys": manifest["size"],
        "dim": manifest["dim"],
        "index": manifest["index"],
        "build_s": manifest["build_seconds"],
        "build_cpu_s": manifest.get("build_cpu_seconds"),
        "encode_s": manifest["encode_seconds"],
        "forward_s": forward["tokens"] / forward["tokens_per_s"],
        "build_s_per_1m": manifest["build_seconds"] * per_million,
        "mib": manifest["bytes"] / 2**20,
        "mib_per_1m": manifest["bytes"] / 2**20 * per_million,
    }, store


def row_generation(
    run: Run, store: Path, *, k: int, lmbda: float, temperature: float, tokens: int, rounds: int
) -> dict:
    """Generated tokens per second with and without the store (greedy, the run's sample prompt)."""
    mixed = with_knn(run, store, k=k, lmbda=lmbda, temperature=temperature)
    prompt = run.config.sample.prompt or "\n"
    runners = {"plain": run, "knn": mixed}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for which in runners.values():  # warm-up: load models and store
        "".join(which.generate(prompt, max_new_tokens=2, greedy=True, device="cpu"))
    for _ in range(rounds):
        for name, which in runners.items():
            start = time.perf_counter()
            "".join(which.generate(prompt, max_new_tokens=tokens, greedy=True, device="cpu"))
            times[name].append(time.perf_counter() - start)
    plain, knn = (tokens / statistics.median(times[n]) for n in ("plain", "knn"))
    return {
        "gen_tokens_per_s_plain": plain,
        "gen_tokens_per_s_knn": knn,
        "ms_per_query": 1e3 * (1 / knn - 1 / plain),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", action="append", help="store text (default: the run's training split file)")
    parser.add_argument("--eval", help="evaluation text (default: the run's validation split)")
    parser.add_argument("--store", type=Path, help="an existing store to reuse (skips the build row)")
    parser.add_argument("--batch-size", type=int, help="windows per batch while building (default: eval's)")
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--lmbda", type=float, default=0.25)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--tune", action="store_true", help="tune lambda and T on half the eval text")
    parser.add_argument("--tokens", type=int, default=100, help="generated tokens per timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the raw numbers to this file")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run = Run.open(args.run)
    with tempfile.TemporaryDirectory(prefix="lmzoo-bench-") as workdir:
        data = args.data
        if data is None:  # the run's training split, written out as a file
            data = [str(Path(workdir) / "train.txt")]
            Path(data[0]).write_text(split_text(run.config.data, "train", 1 << 62), encoding="utf-8")
        build, store = row_build(run, data, args.store, Path(workdir), args.batch_size)
        options = dict(k=args.k, lmbda=args.lmbda, temperature=args.temperature)
        generation = row_generation(run, store, **options, tokens=args.tokens, rounds=args.rounds)
        loss = evaluate_knn(run, store, data=args.eval, **options, tune_options=args.tune, device=CPU)
    results = {
        "run": str(run.path),
        "data": data,
        "eval": args.eval or "val split",
        **build,
        **generation,
        **loss,
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    print(format_table(results))


def format_table(r: dict) -> str:
    index = r["index"]["kind"] + "".join(f" {k}={v}" for k, v in r["index"].items() if k != "kind")
    tuned = " (tuned on half 1, reported on half 2)" if r["tuned"] else ""
    rows = [
        (
            "datastore build (s)",
            f"{r['forward_s']:.1f} (one forward pass)",
            f"{r['build_s']:.1f}",
            r["build_s"] / r["forward_s"],
        ),
        ("build per 1M tokens (s)", "", f"{r['build_s_per_1m']:.0f}", None),
        ("store size (MiB; per 1M tokens)", "", f"{r['mib']:.0f}; {r['mib_per_1m']:.0f}", None),
        (
            "generation (tokens/s)",
            f"{r['gen_tokens_per_s_plain']:.1f}",
            f"{r['gen_tokens_per_s_knn']:.1f}",
            r["gen_tokens_per_s_knn"] / r["gen_tokens_per_s_plain"],
        ),
        ("query cost per generated token (ms)", "", f"{r['ms_per_query']:.1f}", None),
        (
            f"eval loss (nats/token){tuned}",
            f"{r['loss_base']:.4f}",
            f"{r['loss_knn']:.4f}",
            r["loss_knn"] / r["loss_base"],
        ),
        (
            "eval speed (tokens/s)",
            f"{r['tokens_per_s_base']:,.0f}",
            f"{r['tokens_per_s_knn']:,.0f}",
            r["tokens_per_s_knn"] / r["tokens_per_s_base"],
        ),
    ]
    lines = [
        f"{r['run']}: store of {r['keys']:,} keys x {r['dim']} ({index}); k {r['k']}, lambda {r['lmbda']}, "
        f"T {r['temperature']:g}; eval on {r['eval']} ({r['tokens']:,} tokens)",
        "",
        "| row | baseline | with retrieval | ratio |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {base} | {knn} | {'' if ratio is None else f'{ratio:.3g}x'} |"
        for name, base, knn, ratio in rows
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
