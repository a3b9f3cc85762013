"""Llama and its close relatives (Mistral, Qwen2, Qwen3) <-> lmzoo's modern family.

They are one decoder with switches: RoPE base, RMSNorm epsilon, grouped-query attention, SwiGLU,
a tied or untied output layer; Qwen2 adds biases to the query/key/value projections (`qkv_bias`),
Qwen3 normalises each head's query and key (`qk_norm`) and may set its own head width (`head_width`).
Hugging Face rotates the coordinate pairs (i, i + d/2) of a head where lmzoo's own modern models rotate
(2i, 2i + 1): an imported model keeps Hugging Face's layout (`rope_pairs: halves`), and an lmzoo-trained
one is exported with the rows of its query and key projections permuted to it, the same function.
A Mistral sliding window becomes the context length (within it both attend over the same keys).
Export writes Llama, or Qwen3 for a model with QK-norm (see `architecture`).
"""

from __future__ import annotations

from typing import Any

import torch

from lmzoo.interop.layout import EMBEDDING, Layout, Specials, Tensors, refuse, register_layout

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
BLOCK = (
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ff_norm.weight"),
    ("self_attn.q_proj.weight", "attn.q_proj.weight"),
    ("self_attn.k_proj.weight", "attn.k_proj.weight"),
    ("self_attn.v_proj.weight", "attn.v_proj.weight"),
    ("self_attn.o_proj.weight", "attn.o_proj.weight"),
    ("mlp.gate_proj.weight", "ff.gate.weight"),
    ("mlp.up_proj.weight", "ff.up.weight"),
    ("mlp.down_proj.weight", "ff.down.weight"),
)
QKV_BIAS = tuple((f"self_attn.{p}_proj.bias", f"attn.{p}_proj.bias") for p in "qkv")
QK_NORM = (
    ("self_attn.q_norm.weight", "attn.q_norm.weight"),
    ("self_attn.k_norm.weight", "attn.k_norm.weight"),
)


def rope_settings(config: dict[str, Any]) -> tuple[float, list[Any] | None]:
    """(rope base, Llama 3.1 scaling or None) from config.json, in the transformers 5 spelling or the older
    one; other kinds of scaling are refused."""
    parameters = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    base = parameters.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = parameters.get("rope_type") or parameters.get("type") or "default"
    if kind == "default":
        return float(base), None
    if kind != "llama3":
        raise refuse("config.json", "rope scaling", kind, "lmzoo scales RoPE as Llama 3.1 does (llama3) only")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return float(base), [parameters[key] for key in keys]


def model_section(config: dict[str, Any]) -> dict[str, Any]:
    """The modern `model:` section equal to a Llama, Mistral, Qwen2 or Qwen3 config.json."""
    where, model_type = "config.json", config.get("model_type")
    base, llama3 = rope_settings(config)
    checks = (
        ("hidden_act", "silu", "lmzoo's modern feed-forward is SwiGLU"),
        ("attention_bias", False, "lmzoo has biases on q/k/v only, not on the attention output"),
        ("mlp_bias", False, "lmzoo's SwiGLU has no biases"),
        ("partial_rotary_factor", 1.0, "lmzoo rotates whole heads"),
    )
    for key, expected, why in checks:
        if config.get(key, expected) != expected:
            raise refuse(where, key, config[key], why)
    d_model, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    context = int(config.get("max_position_embeddings", 2048))
    window = config.get("sliding_window")
    if window and (model_type == "mistral" or config.get("use_sliding_window")):
        context = min(context, int(window))
    head_width = config.get("head_dim")
    return {
        "name": "modern",
        "d_model": d_model,
        "n_heads": heads,
        "n_kv_heads": int(config.get("num_key_value_heads") or heads),
        "n_layers": int(config["num_hidden_layers"]),
        "d_ff": int(config["intermediate_size"]),
        "context_length": context,
        "dropout": 0.0,
        "tie_weights": bool(config.get("tie_word_embeddings", False)),
        "rope_base": base,
        "rope_pairs": "halves",
        "rope_llama3": llama3,
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "qk_norm": model_type == "qwen3",
        "qkv_bias": model_type == "qwen2",
        "head_width": int(head_width) if head_width and int(head_width) != d_model // heads else None,
    }


def names(model: Any) -> list[tuple[str, str]]:
    pairs = [("model.embed_tokens.weight", EMBEDDING), ("model.norm.weight", "final_norm.weight")]
    block = BLOCK + (QKV_BIAS if model.qkv_bias else ()) + (QK_NORM if model.qk_norm else ())
    for i in range(model.n_layers):
        pairs += [(f"model.layers.{i}.{hf}", f"blocks.{i}.{ours}") for hf, ours in block]
    return pairs


def architecture(model: Any) -> str:
    """The Hugging Face model_type a modern model exports as: Qwen3 with QK-norm, else Llama (with q/k/v
    biases as Llama's attention_bias, its o_proj bias zero). Not Qwen2: transformers 5 loads a Qwen2
    folder with Qwen's own tokenizer pipeline whatever tokenizer.json says, which would break lmzoo's."""
    return "qwen3" if model.qk_norm else "llama"


def exported_names(model: Any) -> list[tuple[str, str]]:
    """What export writes: the imported names, plus the zero o_proj biases of a Llama with q/k/v biases."""
    pairs = names(model)
    if model.qkv_bias:
        pairs += [
            (f"model.layers.{i}.self_attn.o_proj.bias", f"blocks.{i}.attn.o_proj.bias")
            for i in range(model.n_layers)
        ]
    return pairs


def hf_config(model: Any, vocab_size: int, specials: Specials) -> dict[str, Any]:
    """The config.json of the Llama or Qwen3 model equal to a modern model."""
    model_type = architecture(model)
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": model.d_model,
        "intermediate_size": model.ff_hidden,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.kv_heads,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model.context_length,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_base},
        "attention_bias": bool(model.qkv_bias),
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": model.tie_weights,
        "bos_token_id": specials.bos,
        "eos_token_id": specials.eos,
        "pad_token_id": specials.pad,
        "use_cache": True,
    }
    if model.rope_llama3 is not None:
        factor, low, high, original = model.rope_llama3
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high}
        scaling["original_max_position_embeddings"] = original
        config["rope_scaling"] = scaling
        config["rope_parameters"] = {**scaling, "rope_theta": model.rope_base}
    if model_type != "llama":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=model.n_layers)
    else:
        config["mlp_bias"] = False
    return config


def halves_order(head_dim: int) -> torch.Tensor:
    """The permutation taking a head's interleaved RoPE layout (pairs 2i, 2i+1) to halves (i, i + d/2)."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def permute_heads(tensor: torch.Tensor, head_dim: int, order: torch.Tensor) -> torch.Tensor:
    """Rows of a projection (H * d, ...) or a per-head vector (d,) reordered within each head."""
    heads = tensor.shape[0] // head_dim
    return tensor.reshape(heads, head_dim, *tensor.shape[1:])[:, order].reshape(tensor.shape)


def export_tensors(tensors: Tensors, model: Any) -> Tensors:
    """A modern model's tensors in Hugging Face's RoPE layout (with zero o_proj biases beside q/k/v ones)."""
    out = dict(tensors)
    if model.qkv_bias:
        for i in range(model.n_layers):
            out[f"blocks.{i}.attn.o_proj.bias"] = torch.zeros(model.d_model)
    if model.rope_pairs == "interleaved":
        order = halves_order(model.head_dim)
        rotated = tuple(f"attn.{p}.{kind}" for p in ("q_proj", "k_proj") for kind in ("weight", "bias"))
        rotated += ("attn.q_norm.weight", "attn.k_norm.weight")
        for name in out:
            if name.endswith(rotated):
                out[name] = permute_heads(out[name], model.head_dim, order)
    return out


register_layout(
    Layout(
        family="modern",
        model_types=tuple(ARCHITECTURES),
        model_section=model_section,
        names=names,
        hf_config=hf_config,
        export_tensors=export_tensors,
        ignored=(".rotary_emb.inv_freq",),  # a buffer older checkpoints saved
        exported_names=exported_names,
    )
)
