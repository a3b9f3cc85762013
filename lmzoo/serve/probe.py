"""What the MCP tools and echo logprobs read from a run beyond `Run`'s verbs: a summary for list_runs,
the next-token distribution after a prefix, and a prompt's per-token logprobs in OpenAI's shape.
Read-only; the summary comes from config and checkpoint metadata, so listing runs loads no weights."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from lmzoo.inference.decoding import next_distribution
from lmzoo.inference.scoring import score_sequences
from lmzoo.inference.text import token_pieces, token_text
from lmzoo.run import Run

Entry = tuple[str, float | None, dict[str, float] | None]  # token text, logprob, top alternatives


def run_summary(run: Run) -> dict[str, Any]:
    """Family, tokenizer, parameters, tokens seen and validation loss of the best checkpoint."""
    info = run.info("best")
    vocab = run.vocab_size
    return {
        "name": run.name,
        "kind": run.kind,
        "family": run.config.model.name,
        "tokenizer": run.config.tokenizer.kind,
        "vocab_size": vocab if isinstance(vocab, int) else list(vocab),
        "parameters": run.parameter_count(),
        "step": info.get("step"),
        "tokens_seen": run.tokens_seen(),
        "best_val_loss": info.get("val_loss"),
        "fine_tuned": bool(run.config.init_from),
    }


def next_tokens(
    run: Run, prefix: str, k: int, *, device: str, source: str | None = None
) -> list[tuple[str, int, float]]:
    """The k most likely next tokens after `prefix` (seq2seq: the target prefix given `source`)."""
    return next_distribution(run.load("best", device), prefix, k, source=source)


def prompt_logprobs(run: Run, prompt: str | Sequence[int], k: int, *, device: str) -> list[Entry]:
    """Each token of `prompt` (text, or token ids) scored given every token before it (the first: None),
    as evaluation harnesses read `echo` + `logprobs`: the one scorer's numbers, equal to `lmzoo score` on
    the same text. Each map of alternatives holds the k most likely tokens and the token itself."""
    tokenizer = run.tokenizer
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        return []
    pieces = token_pieces(tokenizer, ids)
    [scores] = score_sequences(run.load("best", device), [ids], top_k=k)
    entries: list[Entry] = [(pieces[0], None, None)]
    for row in range(len(ids) - 1):
        alternatives = [
            (token_text(tokenizer, alt), value)
            for alt, value in zip(
                scores.top_ids[row].tolist(), scores.top_logprobs[row].tolist(), strict=True
            )
        ]
        logprob = float(scores.logprobs[row])
        token = token_text(tokenizer, ids[row + 1])
        entries.append((pieces[row + 1], logprob, top_map(alternatives, token, logprob)))
    return entries


def top_map(alternatives: Iterable[tuple[str, float]], token: str, logprob: float) -> dict[str, float]:
    """OpenAI's legacy `top_logprobs` entry: token text -> logprob of the alternatives, most likely
    first, and of the token itself (as OpenAI's: up to k + 1 entries)."""
    top: dict[str, float] = {}
    for text, value in alternatives:
        top.setdefault(text, value)
    top.setdefault(token, logprob)
    return top
