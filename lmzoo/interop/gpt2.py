"""GPT-2 (GPT2LMHeadModel) <-> lmzoo's gpt family.

GPT-2 is a pre-LN gpt with learned positions, biases everywhere, the tanh approximation of GELU
(`gelu_new`) and the output layer tied to the embedding. Its linear layers are Conv1D modules that
store weights as (in, out), so every matrix is transposed on the way in and out. Export writes zeros
where a gpt model has no bias, and a sinusoidal gpt's fixed table as GPT-2's learned one (with the
embedding scale folded into the input embedding, the output layer then untied).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lmzoo.interop.layout import EMBEDDING, HEAD, Layout, Specials, Tensors, refuse, register_layout

ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
EXPORTED_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
# (GPT-2 name in block i, lmzoo name in block i)
BLOCK = (
    ("ln_1.weight", "norm1.weight"),
    ("ln_1.bias", "norm1.bias"),
    ("attn.c_attn.weight", "attn.in_proj.weight"),
    ("attn.c_attn.bias", "attn.in_proj.bias"),
    ("attn.c_proj.weight", "attn.out_proj.weight"),
    ("attn.c_proj.bias", "attn.out_proj.bias"),
    ("ln_2.weight", "norm2.weight"),
    ("ln_2.bias", "norm2.bias"),
    ("mlp.c_fc.weight", "ff.up.weight"),
    ("mlp.c_fc.bias", "ff.up.bias"),
    ("mlp.c_proj.weight", "ff.down.weight"),
    ("mlp.c_proj.bias", "ff.down.bias"),
)
TOP = (
    ("transformer.wte.weight", EMBEDDING),
    ("transformer.wpe.weight", "position_embedding.weight"),
    ("transformer.ln_f.weight", "final_norm.weight"),
    ("transformer.ln_f.bias", "final_norm.bias"),
)
CONV1D = ("attn.in_proj.weight", "attn.out_proj.weight", "ff.up.weight", "ff.down.weight")


def model_section(config: dict[str, Any]) -> dict[str, Any]:
    """The gpt `model:` section equal to a GPT-2 config.json."""
    activation = config.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        why = f"lmzoo's gpt has {', '.join(ACTIVATIONS)}"
        raise refuse("config.json", "activation_function", activation, why)
    for key, expected in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if config.get(key, expected) != expected:
            why = "lmzoo's gpt scales attention by 1/sqrt(d) and has no cross-attention"
            raise refuse("config.json", key, config[key], why)
    d_model = int(config.get("n_embd", 768))
    return {
        "name": "gpt",
        "d_model": d_model,
        "n_heads": int(config.get("n_head", 12)),
        "n_layers": int(config.get("n_layer", 12)),
        "d_ff": int(config.get("n_inner") or 4 * d_model),
        "context_length": int(config.get("n_positions", 1024)),
        "dropout": 0.0,
        "tie_weights": bool(config.get("tie_word_embeddings", True)),
        "positions": "learned",
        "norm": "pre",
        "activation": ACTIVATIONS[activation],
        "bias": True,
        "norm_eps": float(config.get("layer_norm_epsilon", 1e-5)),
    }


def names(model: Any) -> list[tuple[str, str]]:
    pairs = list(TOP)
    for i in range(model.n_layers):
        pairs += [(f"transformer.h.{i}.{hf}", f"blocks.{i}.{ours}") for hf, ours in BLOCK]
    return pairs


def canonical(name: str) -> str:
    """Checkpoints saved by older code lack the `transformer.` prefix."""
    return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name


def hf_config(model: Any, vocab_size: int, specials: Specials) -> dict[str, Any]:
    """GPT-2's config.json for a gpt model (pre-LN only: GPT-2 normalises before each sublayer)."""
    if model.norm != "pre":
        raise refuse("model", "norm", model.norm, "GPT-2 is pre-LN; a post-LN gpt has no GPT-2 counterpart")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_positions": model.context_length,
        "n_embd": model.d_model,
        "n_layer": model.n_layers,
        "n_head": model.n_heads,
        "n_inner": model.d_ff or 4 * model.d_model,
        "activation_function": EXPORTED_ACTIVATIONS[model.activation],
        "layer_norm_epsilon": model.norm_eps,
        "resid_pdrop": model.dropout,
        "embd_pdrop": model.dropout,
        "attn_pdrop": model.dropout,
        "scale_attn_weights": True,
        "initializer_range": 0.02,
        "bos_token_id": specials.bos,
        "eos_token_id": specials.eos,
        "pad_token_id": specials.pad,
        # lmzoo scales a sinusoidal model's input embedding; GPT-2 has one scale, so the head unties
        "tie_word_embeddings": model.tie_weights and model.positions == "learned",
        "use_cache": True,
    }


def export_tensors(tensors: Tensors, model: Any) -> Tensors:
    """A gpt model's tensors as GPT-2 has them: zero biases where it has none, positions as a table."""
    out = dict(tensors)
    if model.positions == "sinusoidal":
        from lmzoo.models.attention import sinusoidal_positions

        out["position_embedding.weight"] = sinusoidal_positions(model.context_length, model.d_model)
        out[HEAD] = out.get(HEAD, out[EMBEDDING])
        out[EMBEDDING] = out[EMBEDDING] * math.sqrt(model.d_model)  # the scale lmzoo applies to the input
    for _, ours in names(model):
        if ours not in out and ours.endswith(".bias"):  # bias: false
            out[ours] = torch.zeros(out[ours.replace(".bias", ".weight")].shape[0])
    return out


register_layout(
    Layout(
        family="gpt",
        model_types=("gpt2",),
        model_section=model_section,
        names=names,
        hf_config=hf_config,
        export_tensors=export_tensors,
        transposed=CONV1D,
        ignored=(".attn.bias", ".attn.masked_bias"),  # the causal-mask buffers older checkpoints saved
        canonical=canonical,
    )
)
