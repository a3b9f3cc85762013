"""Held-out evaluation: mean token loss and perplexity of a language model on a token stream."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lmzoo.data import eval_windows
from lmzoo.device import autocast
from lmzoo.models.base import PAD_ID


@torch.inference_mode()
def evaluate_lm(
    model: torch.nn.Module,
    stream: torch.Tensor,
    *,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    device: torch.device,
    precision: str = "fp32",
) -> dict[str, float]:
    """Token-weighted mean NLL (nats) and perplexity over the stream, read in order.

    Recurrent models carry their state from one window to the next, as in training, so every
    token after the first window is predicted with the full left context.
    """
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    for x, y in eval_windows(stream, batch_size, seq_len, max_batches):
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            h, new_state = model.features(x, state if model.carries_state else None)
            loss = model.head.loss(h, y, ignore_index=PAD_ID)
        state = new_state
        tokens = int((y != PAD_ID).sum())
        total += float(loss) * tokens
        count += tokens
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": float(count)}


def evaluate_run(
    run_dir: Path, *, data: Path | None = None, split: str = "val", checkpoint: str = "best", device: str = "auto"
) -> dict[str, float]:
    """Score a trained run on a text file, or on its own validation/test split."""
    from lmzoo.checkpoint import load_run
    from lmzoo.data import encode_stream, read_splits, read_text_file
    from lmzoo.device import pick_device, pick_precision
    from lmzoo.errors import ConfigError

    if split not in ("val", "test"):
        raise ConfigError(f"--split must be val or test, got {split!r}")
    torch_device = pick_device(device)
    run = load_run(run_dir, checkpoint, torch_device)
    text = read_text_file(data) if data is not None else getattr(read_splits(run.config.data), split)
    if not text.strip():
        raise ConfigError(f"the run's {split} split is empty; pass --data FILE")
    stream = encode_stream(run.tokenizer, text)
    cfg = run.config
    return evaluate_lm(
        run.model, stream, batch_size=cfg.data.eval_batch_size or cfg.data.batch_size, seq_len=cfg.seq_len,
        device=torch_device, precision=pick_precision(torch_device, cfg.train.precision),
    )
