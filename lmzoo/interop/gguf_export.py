"""A modern run out to GGUF, the file llama.cpp runs (`lmzoo export --format gguf`), written with the
`gguf` package, llama.cpp's own writer (an optional dependency, imported here only).

The run goes through its Hugging Face form first (lmzoo.interop.exporter), then tensor names follow
llama.cpp's own map from Hugging Face names: Llama as llama.cpp's `llama` architecture (whose RoPE
rotates interleaved pairs, so the query and key rows are permuted back as llama.cpp's converter does),
Qwen3 as `qwen3`. Weights are float32; llama.cpp's `llama-quantize` makes them
smaller. The vocabulary must be byte-level BPE (lmzoo's bpe, or an imported GPT-2, Llama 3 or Qwen
tokenizer): char and word tokenizers have no llama.cpp counterpart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lmzoo.errors import CheckpointError
from lmzoo.interop.exporter import Exported, exported
from lmzoo.run import Run

ARCHITECTURES = {"llama": "LLAMA", "qwen3": "QWEN3"}  # Hugging Face model_type -> gguf's
# llama.cpp's name for the pre-tokenizer (how text is split before BPE), by a piece of its split pattern:
# Llama 3 keeps up to three digits together, Qwen2 one
PRE_TOKENIZERS = {"\\p{N}{1,3}": "llama-bpe", "\\p{N}|": "qwen2"}


def _llama_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's RoPE layout (pairs i, i + d/2) back to llama.cpp's llama one (pairs 2i, 2i + 1)."""
    shape = tensor.shape
    return tensor.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _tokenizer_json(model: Exported, where: str) -> dict[str, Any]:
    backend = getattr(model.tokenizer, "backend", None)
    content = json.loads(backend.to_str()) if backend is not None else {}
    kind = (content.get("model") or {}).get("type")
    decoder = (content.get("decoder") or {}).get("type")
    if kind != "BPE" or decoder != "ByteLevel":
        raise CheckpointError(
            f"{where}: GGUF export needs a byte-level BPE tokenizer (kind bpe, or an imported GPT-2, Llama 3 "
            "or Qwen one); export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    return content


def _pre_tokenizer(content: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer type for a tokenizer.json (its converter tells them apart by a hash of
    the tokens of a test text; this reads the split pattern, and knows GPT-2's, Llama 3's and Qwen2's)."""
    pre = content.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # GPT-2's own split, which lmzoo's bpe tokenizer uses too
    pattern = json.dumps(pre)
    return next((name for piece, name in PRE_TOKENIZERS.items() if piece in pattern), "default")


def _vocabulary(writer: Any, model: Exported, content: dict[str, Any]) -> None:
    """Tokens (the model's rows; unused ones as [PAD<i>]), their types, the merges, the special ids."""
    import gguf

    vocab: dict[str, int] = dict(content["model"]["vocab"])
    special = {t["content"]: t["id"] for t in content.get("added_tokens") or [] if t.get("special")}
    vocab.update({t["content"]: t["id"] for t in content.get("added_tokens") or []})
    by_id = {i: token for token, i in vocab.items()}
    rows = model.config["vocab_size"]
    tokens, types = [], []
    for i in range(rows):
        token = by_id.get(i)
        tokens.append(token if token is not None else f"[PAD{i}]")
        kind = gguf.TokenType.UNUSED if token is None else gguf.TokenType.NORMAL
        types.append(gguf.TokenType.CONTROL if token in special else kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in content["model"].get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(content))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, value in (
        ("bos", model.specials.bos),
        ("eos", model.specials.eos),
        ("pad", model.specials.pad),
    ):
        if isinstance(value, int):
            getattr(writer, f"add_{name}_token_id")(value)
    writer.add_add_bos_token(False)


def export_gguf(run: Run, out: str | Path, checkpoint_tag: str = "best") -> Path:
    """Write the modern run `run` as the GGUF file `out` (written whole under a temporary name)."""
    import gguf

    target = Path(out)
    if target.exists():
        raise CheckpointError(f"{target} already exists; pass out=FILE with a new file name", param="out")
    model = exported(run, checkpoint_tag)
    config = model.config
    arch_name = ARCHITECTURES.get(config["model_type"])
    if arch_name is None:
        raise CheckpointError(
            f"{run.path}: GGUF export is for modern runs (llama.cpp's llama and qwen3); export this "
            "run with --format hf (llama.cpp's convert_hf_to_gguf.py reads GPT-2 folders)"
        )
    content = _tokenizer_json(model, str(run.path))
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(staging), gguf.MODEL_ARCH_NAMES[arch])
    try:
        writer.add_name(run.name)
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_embedding_length(config["hidden_size"])
        writer.add_block_count(config["num_hidden_layers"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(config["num_attention_heads"])
        writer.add_head_count_kv(config["num_key_value_heads"])
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
        writer.add_rope_dimension_count(config["head_dim"])
        writer.add_rope_freq_base(config["rope_theta"])
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
        writer.add_vocab_size(config["vocab_size"])
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        _vocabulary(writer, model, content)
        heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
        for hf, tensor in model.tensors.items():
            projection = hf.rsplit(".", 2)[-2]
            if arch_name == "LLAMA" and projection in heads:
                tensor = _llama_rows(tensor, heads[projection])
            name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise CheckpointError(f"{run.path}: llama.cpp has no place for tensor {hf!r}")
            writer.add_tensor(name, tensor.float().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    return target
