"""lmzoo data benchmark: preparing large corpora and training on them, against a plain memmap reader.

    python scripts/bench_data.py --sizes 50M 200M          # corpora, prepare, train, batch fetch
    python scripts/bench_data.py --sizes 2G --parts prepare --tokenizers char word bpe
    python scripts/bench_data.py --parts fetch --sizes 2G  # batch fetch only (prepares char if needed)
    python scripts/bench_data.py --before /tmp/lmzoo-before --sizes 50M 200M --parts train

Corpora of the given sizes are generated locally from the bundled text (Tiny Shakespeare lines and
Tatoeba sentences, shuffled per block with a seeded RNG; no network) under --dir, once. Measured:

* prepare: `prepare_corpus` from scratch (scan, fit, encode) per tokenizer, in its own process: MB/s
  and the process's peak RSS;
* train: `lmzoo train configs/gpt.yaml data.train=CORPUS` for --steps steps on an already prepared
  corpus, in its own process: peak RSS, and the time from the command to the end of the first step
  (metrics.jsonl logs every step with its wall-clock time); the same on Tiny Shakespeare beside it.
  With --before DIR (a checkout of an lmzoo without prepared corpora), its `lmzoo train` is measured
  the same way (it reads the whole corpus into memory: small sizes only);
* open: milliseconds to find a prepared corpus in the cache (every source checked) and map its splits;
* fetch: batches of random windows from the prepared train.bin, lmzoo's RandomWindows against a plain
  numpy memmap + random offsets reader (nanoGPT's get_batch: a new np.memmap per batch, one slice per
  row; and the same with the memmap opened once), interleaved in one process, at (batch 12, context
  64) and (batch 64, context 1024).

Results are appended as JSON lines to --out and printed as markdown rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
CORPORA = ROOT / "lmzoo" / "corpora"
UNITS = {"K": 10**3, "M": 10**6, "G": 10**9}
TOKENIZERS = {"char": {"kind": "char"}, "word": {"kind": "word"}, "bpe": {"kind": "bpe", "vocab_size": 2048}}


def size_of(label: str) -> int:
    return int(float(label[:-1]) * UNITS[label[-1].upper()])


# ---- corpora ------------------------------------------------------------------------------------


def corpus_lines() -> list[str]:
    """Every line of the bundled text corpora (Shakespeare, English and German sentences)."""
    lines = (CORPORA / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    for name in ("train.en", "train.de"):
        lines += (CORPORA / "tatoeba_deu_eng" / name).read_text(encoding="utf-8").splitlines(keepends=True)
    return lines


def make_corpus(path: Path, size: int, seed: int = 0) -> Path:
    """A text file of `size` bytes: blocks of the bundled lines, each block shuffled by its own seed."""
    if path.is_file() and path.stat().st_size == size:
        return path
    lines, rng = corpus_lines(), random.Random(seed)
    written = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as handle:
        while written < size:
            rng.shuffle(lines)
            block = "".join(lines).encode("utf-8")[: size - written]
            handle.write(block)
            written += len(block)
    tmp.replace(path)
    return path


# ---- running things in their own process ------------------------------------------------------------


def timed_process(
    command: list[str], env: dict[str, str], cwd: Path | None = None
) -> tuple[str, float, float]:
    """(stdout, wall seconds, peak RSS in MB) of a child process, measured by /usr/bin/time -v."""
    started = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/time", "-v", *command], env=env, cwd=cwd, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    rss = next(
        int(line.split(":")[1]) for line in result.stderr.splitlines() if "Maximum resident set size" in line
    )
    return result.stdout, wall, rss / 1024


PREPARE_CHILD = """
import json, sys, time
from lmzoo.config.schema import DataConfig
from lmzoo.data.prepare import prepare_corpus
from lmzoo.data.tokenizer import TOKENIZER_REGISTRY
fields = json.loads(sys.argv[2])
tokenizer = TOKENIZER_REGISTRY[fields["kind"]].config(**fields)
start = time.perf_counter()
corpus = prepare_corpus(DataConfig(train=sys.argv[1], split=(0.9, 0.1, 0.0)), tokenizer, say=lambda m: None)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "tokens": sum(s["tokens"] for s in corpus.manifest["splits"].values()),
                  "vocab": corpus.tokenizer.vocab_size, "dtype": corpus.manifest["dtype"],
                  "directory": str(corpus.directory)}))
"""


def bench_prepare(corpus: Path, tokenizer: str, cache: Path) -> dict:
    """Prepare `corpus` from scratch (a fresh cache) in a child process."""
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "LMZOO_CACHE_DIR": str(cache)}
    command = [sys.executable, "-c", PREPARE_CHILD, str(corpus), json.dumps(TOKENIZERS[tokenizer])]
    out, wall, rss = timed_process(command, env)
    found = json.loads(out.strip().splitlines()[-1])
    size = corpus.stat().st_size
    return {
        "part": "prepare",
        "corpus_bytes": size,
        "tokenizer": tokenizer,
        "seconds": round(found["seconds"], 2),
        "mb_per_s": round(size / 1e6 / found["seconds"], 1),
        "process_seconds": round(wall, 2),
        "peak_rss_mb": round(rss),
        "tokens": found["tokens"],
        "vocab": found["vocab"],
        "dtype": found["dtype"],
    }


def prepare_for_gpt(corpus: str, cache: Path) -> Path:
    """`lmzoo prepare configs/gpt.yaml data.train=CORPUS` (untimed); the prepared directory."""
    env = {**os.environ, "LMZOO_CACHE_DIR": str(cache)}
    command = [
        sys.executable,
        "-m",
        "lmzoo",
        "prepare",
        str(ROOT / "configs" / "gpt.yaml"),
        f"data.train={corpus}",
    ]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return Path(out.split(": ", 1)[1].split()[0])


def bench_train(corpus: str, steps: int, cache: Path, lmzoo_root: Path | None = None) -> dict:
    """`lmzoo train configs/gpt.yaml` on `corpus` (prepared first, untimed): peak RSS, command to first step."""
    env = {**os.environ, "LMZOO_CACHE_DIR": str(cache), "OMP_NUM_THREADS": str(os.cpu_count())}
    if lmzoo_root is not None:
        env["PYTHONPATH"] = str(lmzoo_root)
    else:
        prepare_for_gpt(corpus, cache)
    with tempfile.TemporaryDirectory(prefix="lmzoo-bench-data-") as out:
        overrides = [
            f"data.train={corpus}",
            f"train.max_steps={steps}",
            f"train.eval_every={steps}",
            "train.eval_batches=4",
            "train.log_every=1",
            f"out_dir={out}",
            "name=bench",
        ]
        command = [sys.executable, "-m", "lmzoo", "train", str(ROOT / "configs" / "gpt.yaml"), *overrides]
        started = time.time()
        _, wall, rss = timed_process([*command, "--no-progress"], env)
        records = [
            json.loads(line) for line in (Path(out) / "bench" / "metrics.jsonl").read_text().splitlines()
        ]
        first_step = next(r["time"] for r in records if r.get("step") == 1 and "train/loss" in r)
    return {
        "part": "train",
        "corpus": corpus,
        "lmzoo": "before" if lmzoo_root is not None else "this",
        "steps": steps,
        "peak_rss_mb": round(rss),
        "command_to_first_step_s": round(first_step - started, 2),
        "process_seconds": round(wall, 2),
    }


def bench_open(corpus: str, cache: Path, rounds: int = 5) -> dict:
    """Milliseconds to find an already prepared corpus in the cache (sources checked) and map its splits:
    the data part of a run's start, in this process (imports excluded)."""
    from lmzoo.data.prepare import prepare_corpus
    from lmzoo.run import load_config

    os.environ["LMZOO_CACHE_DIR"] = str(cache)
    config = load_config(ROOT / "configs" / "gpt.yaml", [f"data.train={corpus}"])
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        prepared = prepare_corpus(config.data, config.tokenizer)
        prepared.tokens("train"), prepared.tokens("val")
        times.append(time.perf_counter() - start)
    return {"part": "open", "corpus": corpus, "open_ms": round(1000 * statistics.median(times), 1)}


# ---- batch fetch -------------------------------------------------------------------------------------


def nanogpt_batch(data: np.ndarray, batch: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's get_batch on a CPU: random offsets, one slice per row, stacked."""
    ix = torch.randint(len(data) - block, (batch,))
    x = torch.stack([torch.from_numpy(data[i : i + block].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block].astype(np.int64)) for i in ix])
    return x, y


def bench_fetch(directory: Path, batch: int, block: int, rounds: int = 7, per_round: int = 200) -> dict:
    """µs per batch, interleaved: lmzoo's RandomWindows over the prepared split; nanoGPT's reader as it is
    (a new np.memmap per batch); and the same reader with the memmap opened once."""
    from lmzoo.data.streams import RandomWindows

    manifest = json.loads((directory / "manifest.json").read_text())
    dtype, path = np.dtype(manifest["dtype"]), directory / "train.bin"
    tokens = np.memmap(path, dtype=dtype, mode="c", shape=(manifest["splits"]["train"]["tokens"],))
    windows, once = RandomWindows(tokens, batch, block, seed=0), np.memmap(path, dtype=dtype, mode="r")
    readers = {
        "lmzoo": windows.next,
        "nanogpt": lambda: nanogpt_batch(np.memmap(path, dtype=dtype, mode="r"), batch, block),
        "memmap_once": lambda: nanogpt_batch(once, batch, block),
    }
    torch.manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(rounds):
        for name, read in readers.items():
            start = time.perf_counter()
            for _ in range(per_round):
                read()
            times[name].append((time.perf_counter() - start) / per_round)
    us = {name: statistics.median(values) * 1e6 for name, values in times.items()}
    return {
        "part": "fetch",
        "corpus_tokens": int(len(tokens)),
        "batch": batch,
        "block": block,
        **{f"{name}_us": round(value, 1) for name, value in us.items()},
        "speedup_vs_nanogpt": round(us["nanogpt"] / us["lmzoo"], 2),
        "speedup_vs_memmap_once": round(us["memmap_once"] / us["lmzoo"], 2),
    }


# ---- main ------------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def emit(out: Path, record: dict) -> None:
    print(json.dumps(record), flush=True)
    with open(out, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def tables(paths: list[Path]) -> str:
    """Markdown tables of the JSON lines `paths` hold (what docs/data.md shows)."""
    rows = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    by = {
        part: [r for r in rows if r["part"] == part]
        for part in ("machine", "prepare", "train", "open", "fetch")
    }
    machine = by["machine"][-1]
    out = [
        f"Measured {machine['date']} on {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}.",
        "",
    ]
    out += [
        "| corpus | tokenizer | prepare MB/s | seconds | peak RSS MB | tokens | dtype |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in by["prepare"]:
        out.append(
            f"| {r['size']} | {r['tokenizer']} | {r['mb_per_s']} | {r['seconds']} | {r['peak_rss_mb']:,} | "
            f"{r['tokens']:,} | {r['dtype']} |"
        )
    out += ["", "| corpus | lmzoo | peak RSS MB | command to first step s |", "|---|---|---:|---:|"]
    for r in by["train"]:
        out.append(f"| {r['size']} | {r['lmzoo']} | {r['peak_rss_mb']:,} | {r['command_to_first_step_s']} |")
    out += ["", "| corpus | open a prepared corpus ms |", "|---|---:|"]
    out += [f"| {r['size']} | {r['open_ms']} |" for r in by["open"]]
    out += [
        "",
        "| corpus | batch x context | lmzoo µs | nanoGPT µs | memmap once µs | vs nanoGPT | vs memmap once |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in by["fetch"]:
        out.append(
            f"| {r['size']} | {r['batch']} x {r['block']} | {r['lmzoo_us']} | {r['nanogpt_us']} | "
            f"{r['memmap_once_us']} | {r['speedup_vs_nanogpt']}x | {r['speedup_vs_memmap_once']}x |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "lmzoo-bench-data")
    parser.add_argument("--sizes", nargs="+", default=["50M", "200M", "1G", "2G"])
    parser.add_argument("--parts", nargs="+", default=["prepare", "train", "fetch"])
    parser.add_argument("--tokenizers", nargs="+", default=list(TOKENIZERS), choices=list(TOKENIZERS))
    parser.add_argument("--steps", type=int, default=20, help="training steps per train row")
    parser.add_argument(
        "--before", type=Path, help="a checkout of lmzoo without prepared corpora, for train rows"
    )
    parser.add_argument("--baseline", action="store_true", help="also a train row on Tiny Shakespeare")
    parser.add_argument("--out", type=Path, default=Path("bench_data.jsonl"))
    parser.add_argument("--table", type=Path, nargs="+", help="print the markdown tables of these results")
    args = parser.parse_args()
    if args.table:
        print(tables(args.table))
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    emit(args.out, {"part": "machine", **machine()})
    cache = args.dir / "cache"
    if args.baseline and "train" in args.parts:
        if args.before is not None:
            before = bench_train("lmzoo:tinyshakespeare.txt", args.steps, cache, args.before)
            emit(args.out, {**before, "size": "1.1M"})
        emit(args.out, {**bench_train("lmzoo:tinyshakespeare.txt", args.steps, cache), "size": "1.1M"})
    for label in args.sizes:
        corpus = make_corpus(args.dir / f"corpus-{label}.txt", size_of(label))
        if "prepare" in args.parts:
            for name in args.tokenizers:
                emit(args.out, {**bench_prepare(corpus, name, args.dir / f"cache-{name}"), "size": label})
                shutil.rmtree(
                    args.dir / f"cache-{name}", ignore_errors=True
                )  # disk: one prepared copy at a time
        if "train" in args.parts:
            if args.before is not None:
                emit(args.out, {**bench_train(str(corpus), args.steps, cache, args.before), "size": label})
            emit(args.out, {**bench_train(str(corpus), args.steps, cache), "size": label})
        if "fetch" in args.parts:
            directory = prepare_for_gpt(str(corpus), cache)
            emit(args.out, {**bench_open(str(corpus), cache), "size": label})
            for batch, block in ((12, 64), (64, 1024)):
                emit(args.out, {**bench_fetch(directory, batch, block), "size": label})


if __name__ == "__main__":
    main()
