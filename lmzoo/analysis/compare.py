"""A fair comparison of language-model configs: same data, validation text, seeds and token budget.

    from lmzoo.analysis.compare import compare
    result = compare(["configs/compare/lstm.yaml", "configs/compare/gpt.yaml"], tokens=1_000_000)

Each config trains for the same number of tokens (its steps are the budget divided by its tokens per
step, batch_size x seq_len x grad_accum, so every run sees the budget to within half a batch), from
the same seed(s), evaluated on the whole validation split at the same fractions of the budget. A
finished run under `<out>/runs` whose resolved config matches is reused, not retrained. Runs are
ranked by validation bits per character, which compares models across tokenizers:

    bits/char = loss (nats/token) x tokens scored / (characters those tokens cover x ln 2)

`lmzoo.analysis.compare_files` writes the table, config diff, curves and samples.
"""

from __future__ import annotations

import math
import resource
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmzoo.errors import ConfigError, LmzooError

if TYPE_CHECKING:
    from lmzoo.run import Run

EVALS_PER_RUN = 10  # evaluations at 10%, 20%, ... of the token budget: points on the curves
LEDGER = "measured.json"  # <out>/measured.json: wall time and peak memory measured around each training call
SEED_SPREAD = "std"  # with --seeds K: cells are mean ± sample standard deviation over the seeds


@dataclass
class Planned:
    """One training run of the comparison: a config at one seed, with its token budget in steps."""

    label: str  # the config file's stem (unique within the comparison)
    source: str  # the config file
    seed: int
    config: Any  # lmzoo.config.schema.RunConfig, resolved, with the comparison's overrides
    tokens_per_step: int


@dataclass
class Result:
    """One finished run: the numbers of the table and its curves."""

    planned: Planned
    run_dir: Path
    reused: bool
    row: dict[str, Any]
    curve_tokens: list[float]
    curve_seconds: list[float | None]
    curve_loss: list[float]


@dataclass
class Comparison:
    results: list[Result]
    tokens: int
    seeds: list[int]
    validation: dict[str, Any]  # sha256 and characters of the validation text every run shares
    trained: int = 0  # runs trained by this call (the others were reused)
    samples: dict[str, str] = field(default_factory=dict)  # label -> sample from the first seed's run
    prompt: str = ""


# ---- planning --------------------------------------------------------------------------------


def plan(
    paths: Sequence[str | Path], *, tokens: int, seeds: list[int], out: Path, device: str | None = None
) -> list[Planned]:
    """Resolve each config with the comparison's overrides: seed, steps for the token budget, evaluation
    of the whole validation split every tenth of the budget, no early stopping, runs under out/runs."""
    from lmzoo.run import resolve_config
    from lmzoo.run.config import read_config_file

    if len(paths) < 2:
        raise ConfigError("compare needs at least two configs (e.g. lmzoo compare configs/compare/*.yaml)")
    if tokens < 1:
        raise ConfigError(f"tokens must be positive, got {tokens}", param="tokens")
    labels = _labels([Path(p) for p in paths])
    planned = []
    for path, label in zip(paths, labels, strict=True):
        base = resolve_config(read_config_file(path), source=str(path))
        if base.kind != "lm" or base.data.format != "text":
            raise ConfigError(
                f"{path}: compare trains language models on plain text (not {base.data.format} data)"
            )
        per_step = base.data.batch_size * base.seq_len * base.train.grad_accum
        steps = max(1, round(tokens / per_step))
        for seed in seeds:
            raw = read_config_file(path)
            raw.update(name=f"{label}-s{seed}", out_dir=str(out / "runs"), seed=seed)
            raw.setdefault("data", {})["seq_len"] = base.seq_len
            train = raw.setdefault("train", {})
            train.update(max_steps=steps, epochs=None, eval_every=max(1, steps // EVALS_PER_RUN))
            train.update(eval_batches=None, patience=None)
            if device is not None:
                train["device"] = device
            config = resolve_config(raw, source=str(path))
            planned.append(Planned(label, str(path), seed, config, per_step))
    return planned


def _labels(paths: list[Path]) -> list[str]:
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{p.parent.name}-{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]


def check_same_validation(planned: list[Planned]) -> dict[str, Any]:
    """The validation text every config shares (sha256, characters, and whether the training text is
    shared too); ConfigError when the validation texts differ. Each config's corpus is prepared here
    (with the tokenizer its run will fit), so the runs start from the cache."""
    from lmzoo.data.prepare import prepare_corpus

    seen: dict[str, tuple[str, int, str]] = {}
    for item in planned:
        if item.source not in seen:
            corpus = prepare_corpus(item.config.data, item.config.tokenizer)
            chars = corpus.characters("val") or 0
            seen[item.source] = (corpus.identity("val"), chars, corpus.identity("train"))
    (first, (digest, chars, train)), *others = seen.items()
    for source, (other, count, _) in others:
        if other != digest:
            raise ConfigError(
                f"{first} and {source} validate on different text ({chars:,} vs {count:,} characters); "
                "compare needs the same data.train, data.val and data.split in every config"
            )
    same_train = all(t == train for _, _, t in seen.values())
    return {"sha256": digest, "characters": chars, "same_training_text": same_train}


# ---- training or reusing -----------------------------------------------------------------------


def comparable(config: Any) -> dict[str, Any]:
    """A resolved config as a dict without its name (a second run of a config gets <name>-2)."""
    return {k: v for k, v in config.to_dict().items() if k != "name"}


def matching_run(config: Any) -> Path | None:
    """A finished run under config.out_dir whose resolved config equals `config` (name aside)."""
    from lmzoo.run import Run

    root, wanted = Path(config.out_dir), comparable(config)
    for run_dir in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            saved = Run.open(run_dir)
            if (
                comparable(saved.config) == wanted
                and saved.info("last").get("step") == config.train.max_steps
            ):
                return run_dir
        except LmzooError:
            continue
    return None


class PeakMemory:
    """Peak memory of one training call: the CUDA allocator's peak, or on CPU the process's resident set
    size (ru_maxrss when the call raised the process's peak, else the highest RSS sampled every 20 ms)."""

    def __init__(self, device: Any) -> None:
        self.device, self.peak, self._samples = device, 0, [0]
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._before = _maxrss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self._samples.append(_rss())

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            import torch

            self.peak = int(torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        self._thread.join()
        after = _maxrss()
        self.peak = after if after > self._before else max(self._samples)


def _maxrss() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kilobytes on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _rss() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return _maxrss()
    return pages * resource.getpagesize()


def train_measured(config: Any, *, progress: bool) -> tuple[Path, dict[str, Any]]:
    """lmzoo.training.loop.train(config) timed, with its peak memory and the device it ran on."""
    from lmzoo.device import pick_device
    from lmzoo.training import loop as training

    device = pick_device(config.train.device)
    start = time.perf_counter()
    with PeakMemory(device) as memory:
        run_dir = training.train(config, progress=progress)
    measured: dict[str, Any] = {"wall_seconds": time.perf_counter() - start, "peak_memory_bytes": memory.peak}
    measured["device"] = _device_name(device)
    return Path(run_dir), measured


def _device_name(device: Any) -> str:
    if device.type == "cuda":
        import torch

        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


# ---- what a run scored -------------------------------------------------------------------------


def eval_coverage(run: Run) -> tuple[int, int]:
    """(tokens, characters) that the run's validation evaluation scores: every token after the first of
    the validation text, up to the run's evaluation budget (RunConfig.eval_tokens).

    Characters are those of the covered tokens decoded; for a tokenizer that does not give the text back
    (word-level: case and punctuation dropped) they are the validation text's characters in proportion."""
    config, tokenizer = run.config, run.tokenizer
    corpus = run.prepared()
    stream = corpus.tokens("val")
    budget = config.eval_tokens
    scored = stream[1 : None if budget is None else budget + 1].tolist()
    tokens = len(scored)
    whole = len(tokenizer.decode(stream.tolist()))
    characters = corpus.characters("val") or whole
    if whole == characters:  # the tokens give the text back: count the scored ones' characters
        return tokens, len(tokenizer.decode(scored))
    return tokens, round(characters * tokens / max(1, len(stream)))


def bits_per_char(loss: float, tokens: int, characters: int) -> float:
    """Validation bits per character: loss (nats/token) x tokens / (characters x ln 2)."""
    return loss * tokens / (characters * math.log(2))


def parameter_split(model: Any) -> tuple[int, int]:
    """(total, non-embedding) distinct parameters: token and position tables (nn.Embedding) excluded."""
    import torch

    params = {id(p): p for p in model.parameters()}
    embedded = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    total = sum(p.numel() for p in params.values())
    return total, total - sum(p.numel() for key, p in params.items() if key in embedded)


def summarize(item: Planned, run_dir: Path, measured: dict[str, Any], reused: bool) -> Result:
    """The table row and curves of one finished run, read from what it wrote."""
    from lmzoo.run import Run

    run = Run.open(run_dir)
    history = run.history()
    steps, losses, seconds = history.series("val/loss")
    _, train_losses, _ = history.series("train/loss")
    _, speeds, _ = history.series("perf/tokens_per_sec")
    if not losses:
        raise ConfigError(f"{run_dir}: no validation loss in metrics.jsonl; delete the run and compare again")
    last = run.info("last")
    tokens_seen, last_step = run.tokens_seen("last") or 0, int(last.get("step", 0))
    covered_tokens, characters = eval_coverage(run)
    total, non_embedding = parameter_split(run.model("best", "cpu"))
    best = min(losses)
    row = {
        "model": item.label,
        "family": run.config.model.name,
        "params": total,
        "non_embedding_params": non_embedding,
        "tokens": tokens_seen,
        "val_loss_best": best,
        "val_loss_final": losses[-1],
        "val_ppl": math.exp(min(best, 50.0)),
        "val_bpc": bits_per_char(best, covered_tokens, characters),
        "gap": losses[-1] - train_losses[-1] if train_losses else math.nan,
        "tokens_per_sec": statistics.median(speeds) if speeds else math.nan,
        "wall_seconds": measured.get("wall_seconds", history.wall_seconds or math.nan),
        "peak_memory_mb": measured.get("peak_memory_bytes", math.nan) / 2**20,
        "device": measured.get("device") or history.facts.get("device", "?"),
        "seed": item.seed,
        "run": str(run_dir),
    }
    per_step = tokens_seen / max(1, last_step)
    return Result(item, run_dir, reused, row, [s * per_step for s in steps], seconds, losses)


NUMERIC = (  # the table's numeric columns, in order (`gap` is final validation minus final training loss)
    *("params", "non_embedding_params", "tokens", "val_loss_best", "val_loss_final", "val_ppl", "val_bpc"),
    *("gap", "tokens_per_sec", "wall_seconds", "peak_memory_mb"),
)


def aggregate(results: list[Result]) -> list[dict[str, Any]]:
    """One row per config: each numeric cell {"mean", "spread", "values"} over its seeds; sorted by bpc."""
    rows = []
    for label in dict.fromkeys(r.planned.label for r in results):
        mine = [r.row for r in results if r.planned.label == label]
        row: dict[str, Any] = {"model": label, "family": mine[0]["family"], "device": mine[0]["device"]}
        for key in NUMERIC:
            values = [float(m[key]) for m in mine]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            row[key] = {"mean": statistics.fmean(values), "spread": spread, "values": values}
        row["seeds"] = [m["seed"] for m in mine]
        row["runs"] = [m["run"] for m in mine]
        rows.append(row)
    return sorted(rows, key=lambda r: r["val_bpc"]["mean"])


# ---- the whole comparison --------------------------------------------------------------------


def compare(
    paths: Sequence[str | Path],
    *,
    tokens: int,
    seeds: int = 1,
    out: str | Path = "compare",
    device: str | None = None,
    progress: bool = True,
    first_seed: int = 1337,
) -> Comparison:
    """Train (or reuse) every config x seed on the same budget and read back what each run scored."""
    from lmzoo.io import atomic_write_text
    from lmzoo.run.checkpoint import read_json

    if seeds < 1:
        raise ConfigError(f"seeds must be at least 1, got {seeds}", param="seeds")
    out = Path(out)
    seed_list = [first_seed + i for i in range(seeds)]
    planned = plan(paths, tokens=tokens, seeds=seed_list, out=out, device=device)
    validation = check_same_validation(planned)
    ledger = read_json(out / LEDGER)
    import torch.utils.tensorboard  # noqa: F401  (loaded before any timing: else the first run pays for it)

    results, trained = [], 0
    for item in _progress(planned, progress):
        found = matching_run(item.config)
        if found is None:
            run_dir, measured = train_measured(item.config, progress=progress)
            ledger[run_dir.name] = measured
            atomic_write_text(out / LEDGER, _json(ledger))
            trained += 1
        else:
            run_dir, measured = found, ledger.get(found.name, {})
        results.append(summarize(item, run_dir, measured, reused=found is not None))
    return Comparison(results, tokens, seed_list, validation, trained)


def _progress(planned: list[Planned], enabled: bool) -> Any:
    if not enabled:
        return planned
    from tqdm import tqdm

    return tqdm(planned, desc="compare", unit="run", file=sys.stderr, position=0, leave=True)


def _json(payload: Any) -> str:
    import json

    return json.dumps(payload, indent=2, sort_keys=True) + "\n"
