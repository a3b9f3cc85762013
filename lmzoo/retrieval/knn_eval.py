"""Held-out loss with a kNN-LM datastore, and tuning lambda and T on one half of the text.

`evaluate_knn` is what `lmzoo eval --knn` prints: the plain model's loss and the mixed model's loss on
the same text, both through `lmzoo.inference.evaluate.evaluate_lm` (the mixed model is `KnnLM`, so every number
is read the way `lmzoo eval` reads it, from its prepared token file). With `tune`, lambda and T are chosen
on the first half of the tokens, cut at a line end (a grid over the neighbours collected once), and
both losses are reported on the second half.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from lmzoo.data.tokenizer import Tokenizer
from lmzoo.errors import DataError
from lmzoo.retrieval.interpolate import KnnRun, knn_target_logprob, mix, with_knn
from lmzoo.run import Run

LAMBDAS = tuple(round(0.05 * i, 2) for i in range(20)) + (0.975, 0.99)  # 0 keeps tuning from ever hurting
TEMPERATURE_STEPS = tuple(2.0**i for i in range(-4, 5))  # times the median nearest-neighbour distance


def evaluate_tokens(
    run: Run, ids: torch.Tensor, *, checkpoint_tag: str = "best", device: torch.device
) -> dict[str, float]:
    """Loss of `run`'s model on token ids exactly as `lmzoo eval --data` computes it, with tokens/s."""
    from lmzoo.inference.scoring import evaluate_stream

    started = time.perf_counter()
    metrics = evaluate_stream(run.load(checkpoint_tag, device), ids)
    metrics["tokens_per_s"] = metrics["tokens"] / max(time.perf_counter() - started, 1e-9)
    return metrics


def collect(
    run: KnnRun, stream: torch.Tensor, *, checkpoint_tag: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over the token ids `stream`: (LM log-prob of each target (N,), neighbour distances (N, k), neighbour
    carries the target (N, k) bool), read by the scorer's rule."""
    from lmzoo.device import autocast
    from lmzoo.inference.scoring import read_sequences

    lm, store = run.plain.load(checkpoint_tag, device), run.store(checkpoint_tag)
    logps, dists, match = [], [], []
    with torch.inference_mode(), autocast(lm.device, lm.precision):
        for batch in read_sequences(lm, [stream]):
            targets = batch.target
            logp = lm.model.head.logits(batch.hidden).float().log_softmax(-1)
            logps.append(logp.gather(1, targets[:, None]).squeeze(1).double().cpu())
            d, values = store.search(batch.hidden, run.k)
            dists.append(d.masked_fill(values < 0, float("inf")))  # no neighbour: weight 0
            match.append(values == targets.cpu()[:, None])
    return torch.cat(logps), torch.cat(dists), torch.cat(match)


def mixed_loss(
    lm: torch.Tensor, dists: torch.Tensor, match: torch.Tensor, lmbdas: tuple[float, ...], temperature: float
) -> torch.Tensor:
    """Mean interpolated NLL for each lambda at one temperature, from collected neighbours (chunked rows)."""
    totals = torch.zeros(len(lmbdas), dtype=torch.float64)
    for start in range(0, len(lm), 8192):
        rows = slice(start, start + 8192)
        scores = -dists[rows].double() / temperature
        values = torch.where(match[rows], 1, 0)  # carries the target: value 1, else 0
        knn = knn_target_logprob(scores, values, torch.ones(len(values), dtype=torch.long))
        for i, lmbda in enumerate(lmbdas):
            totals[i] -= mix(lm[rows], knn, lmbda).sum()
    return totals / max(len(lm), 1)


def tune(lm: torch.Tensor, dists: torch.Tensor, match: torch.Tensor) -> tuple[float, float, float]:
    """(lambda, T, loss) with the lowest mean loss over LAMBDAS x (median nearest distance x TEMPERATURE_STEPS)."""
    scale = float(dists[:, 0].double().median().clamp(min=1e-6))
    best = (0.0, 1.0, float("inf"))
    for step in TEMPERATURE_STEPS:
        temperature = float(f"{scale * step:.3g}")
        losses = mixed_loss(lm, dists, match, LAMBDAS, temperature)
        i = int(losses.argmin())
        if float(losses[i]) < best[2]:
            best = (LAMBDAS[i], temperature, float(losses[i]))
    return best


def halves(ids: torch.Tensor, tokenizer: Tokenizer, reach: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids cut in two at the line end nearest their middle (within `reach` tokens; else at the middle)."""
    if len(ids) < 4:
        raise DataError("tune splits the text in two halves; it has fewer than 4 tokens", param="tune")
    middle = len(ids) // 2
    for offset in range(min(reach, middle - 1)):
        for cut in (middle + offset, middle - offset):
            if tokenizer.decode([int(ids[cut - 1])]).endswith("\n"):
                return ids[:cut], ids[cut:]
    return ids[:middle], ids[middle:]


def evaluate_knn(
    run: Run,
    index_dir: str | Path,
    *,
    data: str | Path | None = None,
    split: str = "val",
    k: int = 1024,
    lmbda: float = 0.25,
    temperature: float = 1.0,
    tune_options: bool = False,
    checkpoint_tag: str = "best",
    device: torch.device,
) -> dict[str, Any]:
    """Plain and kNN-mixed loss on held-out text; with `tune_options`, lambda and T are tuned on the
    first half of the tokens (cut at a line end) and both losses are reported on the second half."""
    ids = run.evaluation_tokens(data, split)
    mixed = with_knn(run, index_dir, k=k, lmbda=lmbda, temperature=temperature)
    report: dict[str, Any] = {
        "k": k,
        "store_size": mixed.store(checkpoint_tag).size,
        "tuned": tune_options,
    }
    if tune_options:
        first, ids = halves(ids, run.tokenizer)
        lm, dists, match = collect(mixed, first, checkpoint_tag=checkpoint_tag, device=device)
        lmbda, temperature, tune_loss = tune(lm, dists, match)
        mixed.retune(lmbda, temperature)
        report.update(tune_tokens=len(lm), tune_loss_base=float(-lm.mean()), tune_loss_knn=tune_loss)
    base = evaluate_tokens(run, ids, checkpoint_tag=checkpoint_tag, device=device)
    knn = evaluate_tokens(mixed, ids, checkpoint_tag=checkpoint_tag, device=device)
    report.update(
        lmbda=lmbda,
        temperature=temperature,
        tokens=int(base["tokens"]),
        loss_base=base["loss"],
        loss_knn=knn["loss"],
        tokens_per_s_base=base["tokens_per_s"],
        tokens_per_s_knn=knn["tokens_per_s"],
    )
    return report


def describe(report: dict[str, Any]) -> list[str]:
    """The lines `lmzoo eval --knn` prints."""
    lines = []
    if report["tuned"]:
        lines.append(
            f"tuned on the first half ({report['tune_tokens']:,} tokens): lambda {report['lmbda']}, "
            f"T {report['temperature']:g} (loss {report['tune_loss_base']:.4f} -> {report['tune_loss_knn']:.4f})"
        )
    where = "the second half" if report["tuned"] else "the text"
    lines.append(
        f"on {where} ({report['tokens']:,} tokens): loss {report['loss_base']:.4f} -> {report['loss_knn']:.4f} "
        f"with kNN (k {report['k']}, lambda {report['lmbda']}, T {report['temperature']:g}, "
        f"store {report['store_size']:,} keys); {report['tokens_per_s_knn']:,.0f} tokens/s "
        f"(plain {report['tokens_per_s_base']:,.0f})"
    )
    return lines
