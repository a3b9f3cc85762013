"""What the MCP tools read from a run beyond `Run`'s verbs: a summary for list_runs, and the model's
next-token distribution after a prefix (next_tokens). Read-only; parameter counts come from the
safetensors header, so listing runs loads no weights."""

from __future__ import annotations

import math
from typing import Any

from lmzoo.serve.errors import bad_request


def parameter_count(run: Any) -> int | None:
    """Tensors in the checkpoint's weights file (the fine-tuned tensors only, for a LoRA/adapter run)."""
    from safetensors import safe_open

    from lmzoo.checkpoint import ADAPTER, WEIGHTS

    folder = run.checkpoint("best")
    path = folder / WEIGHTS if (folder / WEIGHTS).is_file() else folder / ADAPTER
    with safe_open(str(path), framework="pt") as handle:
        return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())


def tokens_seen(run: Any, step: int | None) -> int | None:
    """Training tokens up to the best checkpoint: steps x batch x sequence x accumulation (language
    models, one process; seq2seq batches vary in length, so None)."""
    cfg = run.config
    if step is None or run.kind != "lm":
        return None
    return int(step) * cfg.data.batch_size * cfg.seq_len * cfg.train.grad_accum


def run_summary(run: Any) -> dict[str, Any]:
    """Family, tokenizer, parameters, tokens seen and validation loss of the best checkpoint."""
    info = run.info("best")
    vocab = run.vocab_size
    return {
        "name": run.name,
        "kind": run.kind,
        "family": run.config.model.name,
        "tokenizer": run.config.tokenizer.kind,
        "vocab_size": vocab if isinstance(vocab, int) else list(vocab),
        "parameters": parameter_count(run),
        "step": info.get("step"),
        "tokens_seen": tokens_seen(run, info.get("step")),
        "best_val_loss": info.get("val_loss"),
        "fine_tuned": bool(run.config.init_from),
    }


def next_tokens(
    run: Any, prefix: str, k: int, *, device: str, source: str | None = None
) -> list[tuple[str, int, float]]:
    """The k most likely next tokens after `prefix` (seq2seq: the target prefix given `source`)."""
    import torch

    from lmzoo.device import pick_device
    from lmzoo.generate import encode_prompt
    from lmzoo.models.base import PAD_ID
    from lmzoo.translate import encode_source

    model = run.model("best", pick_device(device))
    where = next(model.parameters()).device
    with torch.inference_mode():
        if run.kind == "seq2seq":
            if source is None:
                raise bad_request("next_tokens on a seq2seq run needs the source sentence", "source")
            tokenizer = run.target_tokenizer
            src = encode_source(model, run.tokenizer, source)
            memory = model.encode(src, src == PAD_ID)
            tgt = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(prefix)]], device=where)
            logits, _ = model.decode(tgt, memory, src == PAD_ID)
        else:
            tokenizer = run.tokenizer
            ids = encode_prompt(tokenizer, prefix)
            context = getattr(model, "context_len", None)
            ids = ids[-context:] if context else ids
            logits, _ = model(torch.tensor([ids], device=where), model.init_state(1))
        logprobs = logits[0, -1].float().log_softmax(-1)
        values, indices = logprobs.topk(min(k, logprobs.numel()))
    return [(tokenizer.decode([i]), i, v) for v, i in zip(values.tolist(), indices.tolist(), strict=True)]


Entry = tuple[str, float | None, dict[str, float] | None]  # token text, logprob, top alternatives


def prompt_logprobs(run: Any, text: str, k: int, *, device: str) -> list[Entry]:
    """Each token of `text` scored given every token before it (the first: None), as evaluation harnesses
    read `echo` + `logprobs`. A recurrent model reads the text in one pass; a model with a context
    window slides it by half a window, so every token keeps at least half a window of left context.
    For a text of at most seq_len + 1 tokens this is exactly what `lmzoo score` reads."""
    import torch

    from lmzoo.device import pick_device
    from lmzoo.inspect import token_pieces, token_text

    tokenizer = run.tokenizer
    ids = tokenizer.encode(text)
    if not ids:
        return []
    pieces = token_pieces(tokenizer, ids)
    entries: list[Entry] = [(pieces[0], None, None)]
    model = run.model("best", pick_device(device))
    where = next(model.parameters()).device
    window = getattr(model, "context_len", None) or len(ids)
    done = 1
    with torch.inference_mode():
        while done < len(ids):
            end = min(len(ids), max(done + max(1, window // 2), window))
            start = max(0, end - window)
            logits, _ = model(torch.tensor([ids[start:end]], device=where), model.init_state(1))
            rows = logits[0, done - 1 - start : end - 1 - start].float().log_softmax(-1)
            chosen = rows.gather(1, torch.tensor(ids[done:end], device=where)[:, None]).squeeze(1)
            values, top_ids = rows.topk(min(k, rows.shape[-1]), dim=-1)
            for offset, logprob in enumerate(chosen.tolist()):
                top: dict[str, float] = {}
                for alt, value in zip(top_ids[offset].tolist(), values[offset].tolist(), strict=True):
                    top.setdefault(token_text(tokenizer, alt), value)
                entries.append((pieces[done + offset], logprob, top))
            done = end
    return entries
