"""Attention maps of a trained run: what each attention head of the model looks at, for one text.

The model runs once with `record_attention` (lmzoo.models.attention), which makes every attention
module compute its weights explicitly and keep them; nothing here knows a model family. Language
models read the text (cut to the model's context); seq2seq models read the text as the source and a
target (given, or the model's own greedy translation), teacher-forced as in training.

Kinds (lmzoo.models.attention.ATTENTION_KINDS): "self" (bidirectional, an encoder), "decoder" (masked
self-attention: a GPT's, a Transformer decoder's), "cross" (target positions over the source). On the
decoder side, rows are labelled by the token each position predicts; elsewhere by the token read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmzoo.data.tokenizer import Tokenizer
from lmzoo.errors import ConfigError, DataError
from lmzoo.models.attention import ATTENTION_KINDS, attention_modules, record_attention
from lmzoo.models.base import LanguageModel, Seq2SeqModel
from lmzoo.run import Run


@dataclass
class AttentionMap:
    """The weights (heads, queries, keys) of one attention module, with the tokens on each axis."""

    name: str  # the module's name inside the model, e.g. blocks.0.attn
    kind: str
    weights: torch.Tensor  # (H, T, S), float32 on the CPU; each row sums to 1
    queries: list[str]
    keys: list[str]
    heads: list[int] | None = None  # the head number of each row of `weights`; None: 0, 1, ...

    def __post_init__(self) -> None:
        if self.heads is None:
            self.heads = list(range(self.weights.shape[0]))


def token_label(text: str) -> str:
    """A token as a tick label: visible spaces and line breaks."""
    return text.replace("\n", "\\n").replace(" ", "\u2423") or "\u2205"


def attention_maps(
    run: Run,
    text: str,
    *,
    target: str | None = None,
    checkpoint_tag: str = "best",
    device: torch.device,
    warn: Callable[[str], None] | None = None,
) -> list[AttentionMap]:
    """Every recorded attention map of the run's model on `text` (seq2seq: the source; `target` too)."""
    lm = run.load(checkpoint_tag, device)
    model = lm.model
    if not attention_modules(model):
        raise ConfigError(
            f"model {run.config.model.name} has no attention; use lmzoo score to see per-token probabilities"
        )
    if not text:
        raise DataError("the text is empty")
    if run.kind != "seq2seq" and target is not None:
        raise ConfigError("target is for seq2seq runs", param="target")
    with torch.inference_mode(), record_attention(model) as recorded:
        if run.kind == "seq2seq":
            axes = _run_seq2seq(run, lm.seq2seq_model, text, target, device, warn)
        else:
            axes = _run_lm(run, lm.language_model, text, device, warn)
    return [
        AttentionMap(name, recorded.kinds[name], weights[0].float().cpu(), *axes[recorded.kinds[name]])
        for name, weights in recorded.items()
    ]


def _labels(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    from lmzoo.inference.text import token_text

    return [token_label(token_text(tokenizer, i)) for i in ids]


def _run_lm(
    run: Run, model: LanguageModel, text: str, device: torch.device, warn: Callable[[str], None] | None
) -> dict[str, tuple[list[str], list[str]]]:
    tokenizer = run.tokenizer
    ids = tokenizer.encode(text)
    if all(i == tokenizer.unk_id for i in ids):
        raise DataError(f"no token of the text is in the run's vocabulary ({tokenizer.kind} tokenizer)")
    context = model.context_len
    if context is not None and len(ids) > context:
        if warn is not None:
            warn(
                f"warning: the text is {len(ids)} tokens long; showing its first {context} (the model's context)"
            )
        ids = ids[:context]
    model.hidden(torch.tensor([ids], device=device), None)
    labels = _labels(tokenizer, ids)
    return {"decoder": (labels, labels), "self": (labels, labels)}


def _run_seq2seq(
    run: Run,
    model: Seq2SeqModel,
    text: str,
    target: str | None,
    device: torch.device,
    warn: Callable[[str], None] | None,
) -> dict[str, tuple[list[str], list[str]]]:
    from lmzoo.inference.seq2seq import decode_batch
    from lmzoo.inference.text import encode_source
    from lmzoo.models.base import PAD_ID

    source_tok, target_tok = run.tokenizer, run.target_tokenizer or run.tokenizer
    src = encode_source(model, source_tok, text, warn)  # (1, S): tokens + <eos>
    src_ids = src[0].tolist()
    if all(i == source_tok.unk_id for i in src_ids[:-1]):
        raise DataError(f"no token of the source is in the run's vocabulary ({source_tok.kind} tokenizer)")
    limit = min(run.config.data.max_len, model.max_source_len or run.config.data.max_len)
    if target is None:
        banned = target_tok.never_generated
        tgt_ids = decode_batch(
            model, src, bos_id=target_tok.bos_id, eos_id=target_tok.eos_id, max_len=limit, banned_ids=banned
        )[0]
    else:
        tgt_ids = target_tok.encode(target)
    tgt_ids = tgt_ids[: limit - 1]  # <bos> + target within the decoder's positions
    tgt_in = torch.tensor([[target_tok.bos_id, *tgt_ids]], device=device)
    src_mask = src == PAD_ID
    model.decode_hidden(tgt_in, model.encode(src, src_mask), src_mask)
    source = _labels(source_tok, src_ids)
    produced = _labels(target_tok, [*tgt_ids, target_tok.eos_id])  # what each decoder position predicts
    read = _labels(target_tok, tgt_in[0].tolist())
    return {"self": (source, source), "decoder": (produced, read), "cross": (produced, source)}


def select_maps(
    maps: list[AttentionMap], *, which: str | None, layer: int | None, head: int | None, kind: str
) -> list[AttentionMap]:
    """The maps of one kind (default: cross for seq2seq, else all), optionally one layer and one head.

    `layer` counts the modules of that kind from 0, in the model's order; `head` picks one head."""
    if which is not None and which not in ATTENTION_KINDS:
        raise ConfigError(f"which must be one of {', '.join(ATTENTION_KINDS)}, got {which!r}", param="which")
    present = list(dict.fromkeys(m.kind for m in maps))
    if which is None:
        which = "cross" if kind == "seq2seq" and "cross" in present else present[0]
    elif which not in present and kind != "seq2seq" and which == "self":
        which = present[0]  # a language model's self-attention is its (masked) decoder attention
    chosen = [m for m in maps if m.kind == which]
    if not chosen:
        raise ConfigError(f"which {which}: this model has {', '.join(present)} attention only", param="which")
    if layer is not None:
        if not 0 <= layer < len(chosen):
            raise ConfigError(
                f"layer must be between 0 and {len(chosen) - 1} ({which} attention layers)", param="layer"
            )
        chosen = [chosen[layer]]
    if head is not None:
        heads = chosen[0].weights.shape[0]
        if not 0 <= head < heads:
            raise ConfigError(f"head must be between 0 and {heads - 1}", param="head")
        chosen = [
            AttentionMap(m.name, m.kind, m.weights[head : head + 1], m.queries, m.keys, [head])
            for m in chosen
        ]
    return chosen


def format_matrix(item: AttentionMap, head: int = 0, width: int = 6) -> str:
    """One head's weights as a text table, row and column labels included."""
    rows, columns = item.weights[head].tolist(), [label[: width - 1] for label in item.keys]
    label_width = max(len(q) for q in item.queries)
    lines = [" " * label_width + " " + "".join(f"{c:>{width}}" for c in columns)]
    for query, row in zip(item.queries, rows, strict=True):
        lines.append(f"{query:>{label_width}} " + "".join(f"{value:>{width}.2f}" for value in row))
    return "\n".join(lines)
