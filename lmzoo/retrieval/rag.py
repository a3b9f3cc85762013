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
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lmzoo.data.tokenizer import Tokenizer
from lmzoo.errors import ConfigError
from lmzoo.inference.loaded import LoadedModel
from lmzoo.inference.scoring import score_sequences
from lmzoo.retrieval.bm25 import Bm25Index, Passage
from lmzoo.run import Run

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


def context_of(run: Run) -> int | None:
    """The model's context in tokens, from the run's config (None: a recurrent model, no limit);
    seq2seq runs are refused. No weights are read."""
    if run.kind != "lm":
        raise ConfigError(f"{run.path} is a seq2seq run; passages go before the text of a language model")
    return run.config.model.context_len


def retrieve(run: Run, query: str, index: str | Path | Bm25Index, k: int = 4) -> list[Passage]:
    """The `k` best passages for `query` among those that fit `run`'s context (in its tokens)."""
    found = open_index(index)
    context = context_of(run)
    too_long = (lambda p: len(run.tokenizer.encode(p.text + SEPARATOR)) >= context) if context else None
    return found.search(query, k, exclude=too_long)


def rag_prompt(
    run: Run,
    prompt: str,
    index: str | Path | Bm25Index,
    *,
    passages: int = 2,
    max_new_tokens: int = 200,
    warn: Callable[[str], None] | None = None,
) -> tuple[str, list[Passage]]:
    """`prompt` with the best passages that fit before it, and the passages used (best first)."""
    found = open_index(index).search(prompt, passages)
    if not found:
        if warn:
            warn("warning: no passage matches the prompt's words; generating without retrieval")
        return prompt, []
    context = context_of(run)
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
    ids: list[int], tokenizer: Tokenizer, index: Bm25Index, *, window: int, passages: int, seed: int
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


def chunk_losses(lm: LoadedModel, sequences: list[list[int]], chunk: int) -> tuple[float, int]:
    """Summed NLL of the last `chunk` tokens of every sequence (each fits the model's window), and
    their count, through the one scorer."""
    scored = score_sequences(lm, sequences)
    total = -sum(float(s.logprobs[-chunk:].sum()) for s in scored)
    return total, chunk * len(scored)


def evaluate_rag(
    run: Run,
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
    found = open_index(index)
    window = context_of(run) or RECURRENT_WINDOW
    lm = replace(run.load(checkpoint_tag, device), window=window)  # each sequence fits one window
    stream = run.evaluation_tokens(data, split)  # the prepared token file, memory-mapped
    if max_chunks is not None:
        stream = stream[: (max_chunks + 1) * max(1, window // 4)]
    ids = stream.tolist()
    conditions, chunk, guarded = chunk_sequences(
        ids, run.tokenizer, found, window=window, passages=passages, seed=seed
    )
    if not conditions["none"]:
        raise ConfigError(
            f"the text has {len(ids)} tokens, too few for chunks of {chunk} after a window of {chunk}"
        )
    report: dict[str, Any] = {"chunks": len(conditions["none"]), "chunk_tokens": chunk, "window": window}
    for name, sequences in conditions.items():
        total, count = chunk_losses(lm, sequences, chunk)
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
