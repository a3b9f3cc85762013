"""In-context retrieval (Ram et al., "In-Context RALM", 2023): BM25 passages placed before the text.

Generation: the prompt is the query; the best passages that fit the model's context (leaving room for
the prompt and some of the continuation) go before it, the best one nearest the prompt.

Evaluation (`evaluate_rag`): the held-out text is cut into chunks of a quarter of the context; each
chunk is predicted from the same preceding window (the chunk's length) with, before it, (a) nothing,
(b) a random passage, (c) the best BM25 passage for that preceding window. Only the chunk's tokens are
scored, so the three losses cover the same tokens with the same nearby text. A passage that contains
a piece of the chunk itself (any 32 characters of it) is never used: the leakage guard.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmzoo.errors import ConfigError
from lmzoo.retrieval.bm25 import Bm25Index, Passage

SEPARATOR = "\n\n"
GUARD_CHARS = 32
RECURRENT_WINDOW = 512  # models without a context limit: the window evaluation uses


def open_index(index: str | Path | Bm25Index) -> Bm25Index:
    return index if isinstance(index, Bm25Index) else Bm25Index.load(index)


def leaks(chunk_text: str, n: int = GUARD_CHARS) -> Callable[[Passage], bool]:
    """A test for passages that contain `chunk_text` or any `n` consecutive characters of it."""
    n = min(n, len(chunk_text))
    pieces = {chunk_text[i : i + n] for i in range(len(chunk_text) - n + 1)} if n else set()
    return lambda passage: any(piece in passage.text for piece in pieces)


def context_of(run: Any, checkpoint_tag: str = "best") -> int | None:
    """The model's context in tokens (None: a recurrent model, no limit); seq2seq runs are refused.

    Read from the run's config, the same for every checkpoint (`checkpoint_tag` is not needed): no
    weights are loaded."""
    if run.kind != "lm":
        raise ConfigError(f"{run.path} is a seq2seq run; passages go before the text of a language model")
    return run.config.model.context_len


def retrieve(
    run: Any, query: str, index: str | Path | Bm25Index, k: int = 4, *, checkpoint_tag: str = "best"
) -> list[Passage]:
    """The `k` best passages for `query` among those that fit `run`'s context (in its tokens)."""
    found = open_index(index)
    context = context_of(run, checkpoint_tag)
    too_long = (lambda p: len(run.tokenizer.encode(p.text + SEPARATOR)) >= context) if context else None
    return found.search(query, k, exclude=too_long)


def rag_prompt(
    run: Any,
    prompt: str,
    index: str | Path | Bm25Index,
    *,
    passages: int = 2,
    max_new_tokens: int = 200,
    checkpoint_tag: str = "best",
    warn: Callable[[str], None] | None = None,
) -> tuple[str, list[Passage]]:
    """`prompt` with the best passages that fit before it, and the passages used (best first)."""
    found = open_index(index).search(prompt, passages)
    if not found:
        if warn:
            warn("warning: no passage matches the prompt's words; generating without retrieval")
        return prompt, []
    context = context_of(run, checkpoint_tag)
    budget = None
    if context is not None:
        budget = context - len(run.tokenizer.encode(prompt)) - min(max_new_tokens, context // 4)
    used, sizes = [], []
    for passage in found:
        size = len(run.tokenizer.encode(passage.text + SEPARATOR))
        sizes.append(size)
        if budget is None or size <= budget:
            used.append(passage)
            budget = None if budget is None else budget - size
    if not used:
        raise ConfigError(
            f"the model's context ({context} tokens) cannot hold a retrieved passage with the prompt "
            f"(the shortest needs {min(sizes)} tokens); use a gpt with context_length >= 256, or "
            "index with a smaller --passage-chars"
        )
    text = "".join(p.text.rstrip("\n") + SEPARATOR for p in reversed(used)) + prompt
    return text, used


# ---- evaluation ---------------------------------------------------------------------------------


def chunk_sequences(
    ids: list[int], tokenizer: Any, index: Bm25Index, *, window: int, passages: int, seed: int
) -> tuple[dict[str, list[list[int]]], int, int]:
    """Per condition, one token sequence per chunk (passage + preceding window + chunk; the chunk is the
    last `window // 4` tokens); also the chunk length and how many passages the leakage guard removed."""
    chunk = max(1, window // 4)
    budget = window + 1 - 2 * chunk  # room for passages: input length stays within the window
    rng = random.Random(seed)
    conditions: dict[str, list[list[int]]] = {"none": [], "random": [], "retrieved": []}
    guarded = 0
    for start in range(chunk, len(ids) - chunk + 1, chunk):
        preceding, target = ids[start - chunk : start], ids[start : start + chunk]
        exclude = leaks(tokenizer.decode(target))
        best = index.search(tokenizer.decode(preceding), passages, exclude=exclude)
        unguarded = index.search(tokenizer.decode(preceding), passages)
        guarded += sum(1 for p in unguarded if exclude(p))
        other = [
            p for p in rng.sample(index.passages, min(len(index.passages), passages + 8)) if not exclude(p)
        ]
        for name, chosen in (("none", []), ("random", other[:passages]), ("retrieved", best)):
            before = tokenizer.encode("".join(p.text.rstrip("\n") + SEPARATOR for p in reversed(chosen)))
            before = before[-budget:] if chosen and budget > 0 else []
            conditions[name].append(before + preceding + target)
    return conditions, chunk, guarded


def chunk_losses(
    model: torch.nn.Module,
    sequences: list[list[int]],
    chunk: int,
    *,
    device: torch.device,
    precision: str,
    batch: int = 32,
) -> tuple[float, int]:
    """Summed NLL of the last `chunk` tokens of every sequence (right-padded batches), and their count."""
    from lmzoo.device import autocast

    total, count = 0.0, 0
    with torch.inference_mode(), autocast(device, precision):
        for start in range(0, len(sequences), batch):
            group = sequences[start : start + batch]
            width = max(len(s) for s in group) - 1
            x = torch.zeros(len(group), width, dtype=torch.long)
            for row, seq in enumerate(group):
                x[row, : len(seq) - 1] = torch.tensor(seq[:-1])
            h, _ = model.hidden(x.to(device), None)
            logp = model.head.logits(h).float().log_softmax(-1).cpu()
            for row, seq in enumerate(group):
                positions = torch.arange(len(seq) - 1 - chunk, len(seq) - 1)
                total -= float(logp[row, positions, torch.tensor(seq[-chunk:])].sum())
                count += chunk
    return total, count


def evaluate_rag(
    run: Any,
    index: str | Path | Bm25Index,
    *,
    data: str | Path | None = None,
    split: str = "val",
    passages: int = 1,
    max_chunks: int | None = None,
    seed: int = 0,
    checkpoint_tag: str = "best",
    device: torch.device,
) -> dict[str, Any]:
    """Held-out loss of chunks with no passage, a random passage and retrieved passages (see the module)."""
    from lmzoo.data import read_splits, read_text_file
    from lmzoo.device import pick_precision

    if split not in ("val", "test"):
        raise ConfigError(f"--split must be val or test, got {split!r}")
    found = open_index(index)
    window = context_of(run, checkpoint_tag) or RECURRENT_WINDOW
    model = run.model(checkpoint_tag, device)
    text = read_text_file(data) if data is not None else getattr(read_splits(run.config.data), split)
    ids = run.tokenizer.encode(text)
    if max_chunks is not None:
        ids = ids[: (max_chunks + 1) * max(1, window // 4)]
    conditions, chunk, guarded = chunk_sequences(
        ids, run.tokenizer, found, window=window, passages=passages, seed=seed
    )
    if not conditions["none"]:
        raise ConfigError(
            f"the text has {len(ids)} tokens, too few for chunks of {chunk} after a window of {chunk}"
        )
    report: dict[str, Any] = {"chunks": len(conditions["none"]), "chunk_tokens": chunk, "window": window}
    for name, sequences in conditions.items():
        precision = pick_precision(device, run.config.train.precision)
        total, count = chunk_losses(model, sequences, chunk, device=device, precision=precision)
        report[f"loss_{name}"], report["tokens"] = total / count, count
    report.update(passages=passages, guarded=guarded, index_passages=len(found))
    return report


def describe(report: dict[str, Any]) -> str:
    """The line `lmzoo eval --rag` prints."""
    return (
        f"{report['tokens']:,} tokens in {report['chunks']:,} chunks of {report['chunk_tokens']} (each after "
        f"the preceding {report['chunk_tokens']}): loss no passage {report['loss_none']:.4f}, random passage "
        f"{report['loss_random']:.4f}, BM25 passage {report['loss_retrieved']:.4f} ({report['passages']} per chunk "
        f"of {report['index_passages']:,}; {report['guarded']:,} leaking passages excluded)"
    )
