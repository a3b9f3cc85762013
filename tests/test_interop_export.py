"""Exporting runs: a gpt or modern run written in Hugging Face's format loads in `transformers` with no
custom code and computes the same logits (1e-4, fp32); char, word and BPE tokenizers come out as a
tokenizer.json with the same ids and text; a LoRA run exports merged; GGUF files read back with the
right metadata, shapes and values; what has no counterpart is refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SENTENCES, TINY_TEXT, base_config_dict, config_from_dict, deep_merge, tiny_model_section
from hf_models import save_hf_folder

from lmzoo.data.tokenizer import BpeTokenizerConfig, CharTokenizerConfig, WordTokenizerConfig, fit_tokenizer
from lmzoo.errors import CheckpointError
from lmzoo.interop import export_run
from lmzoo.interop.hf_tokenizer import write_tokenizer
from lmzoo.models.peft import merge_finetune
from lmzoo.run import Run
from lmzoo.training.loop import train

transformers = pytest.importorskip("transformers")

TEXTS = [
    "the cat sat on the mat.\nthe dog ate the bone.\n",
    "a bird  sang in\tthe tree.",
    "\nthe mat\n\nthe cat\n",
    "<eos> the <pad> cat",  # text that spells a special token stays text, as in lmzoo
    "the zebra",  # z is no character of the corpus: <unk>
]
TOKENIZERS = {
    "char": CharTokenizerConfig(),
    "word": WordTokenizerConfig(),
    "word-raw": WordTokenizerConfig(lowercase=False, filters="", newline_token=False),
    "bpe": BpeTokenizerConfig(vocab_size=300, min_freq=2),
}


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_exported_tokenizers_give_the_same_ids_and_text(kind, tmp_path):
    tokenizer = fit_tokenizer(TOKENIZERS[kind], TINY_TEXT + "<>\tp")
    write_tokenizer(tokenizer, tmp_path, 64)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (theirs.pad_token_id, theirs.unk_token_id, theirs.bos_token_id, theirs.eos_token_id) == (
        0,
        1,
        2,
        3,
    )
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids, text
        assert theirs.decode(ids) == tokenizer.decode(ids), text
        if kind in ("char", "bpe") and not tokenizer.unknown_pieces(text):
            assert theirs.decode(ids) == text  # char and BPE round-trip any text they cover exactly


def short_run(tmp_path: Path, corpus: Path, name: str, tokenizer: dict, model: dict) -> Run:
    raw = deep_merge(base_config_dict(tmp_path / "runs", corpus, name=name), {"train": {"max_steps": 2}})
    raw["tokenizer"], raw["model"] = tokenizer, model
    return Run.open(train(config_from_dict(raw), progress=False))


RUNS = {
    "gpt-char": ({"kind": "char"}, tiny_model_section("gpt")),
    "gpt-bpe": (
        {"kind": "bpe", "vocab_size": 300},
        tiny_model_section("gpt", positions="sinusoidal", activation="relu", bias=False, norm_eps=1e-6),
    ),
    "gpt-word-untied": (
        {"kind": "word"},
        tiny_model_section("gpt", activation="gelu_tanh", tie_weights=False),
    ),
    "modern-char": ({"kind": "char"}, tiny_model_section("modern")),
    "modern-bpe-qwen3": ({"kind": "bpe", "vocab_size": 300}, tiny_model_section("modern", qk_norm=True)),
    "modern-word-bias": (
        {"kind": "word"},
        tiny_model_section("modern", qkv_bias=True, tie_weights=False, head_width=12, rope_base=500.0),
    ),
}


def perturb(run: Run) -> None:
    """Give every norm gain and bias of the run's checkpoint random values (a trained model would)."""
    model = run.model("best", "cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    run.save_checkpoint("best", model, info=run.info())
    run._loaded.clear()


@pytest.mark.parametrize("name", RUNS)
def test_exported_runs_reload_in_transformers_with_the_same_logits(name, tmp_path, corpus_file):
    run = short_run(tmp_path, corpus_file, name.replace("-", "_"), *RUNS[name])
    perturb(run)
    out = export_run(run, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    expected = {"gpt": "GPT2LMHeadModel", "modern": "LlamaForCausalLM"}[run.config.model.name]
    expected = "Qwen3ForCausalLM" if name.endswith("qwen3") else expected
    assert type(model).__name__ == expected
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = SENTENCES[0] + "\n" + SENTENCES[1][:8]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == run.tokenizer.encode(text)
    with torch.no_grad():
        ours = run.model("best", "cpu")(torch.tensor([ids]))[0]
        theirs = model(torch.tensor([ids])).logits
    assert ours.std() > 0.1
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_an_imported_gpt2_fine_tuned_with_lora_exports_merged(tmp_path, corpus_file):
    folder = save_hf_folder("gpt2", tmp_path / "gpt2")
    raw = deep_merge(
        base_config_dict(tmp_path / "runs", corpus_file, name="lora"),
        {
            "train": {"max_steps": 4, "lr": 3e-2},
            "data": {"seq_len": 16},
            "finetune": {"method": "lora", "r": 4},
        },
    )
    del raw["model"], raw["tokenizer"]
    run = Run.open(train(config_from_dict({**raw, "init_from": f"hf:{folder}"}), progress=False))
    out = export_run(run, tmp_path / "hf")
    merged = merge_finetune(run.trained_model("best", "cpu"))
    assert not any("parametrizations" in name for name in merged.state_dict())
    ids = run.tokenizer.encode(TINY_TEXT[:60])
    hf_ids = torch.tensor([[i - 1 for i in ids]])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        ours = merged(torch.tensor([ids]))[0][..., 1:]
        torch.testing.assert_close(theirs(hf_ids).logits, ours, rtol=0, atol=1e-4)
        assert (base(hf_ids).logits - ours).abs().max() > 1e-2  # the LoRA update is in the export
    assert transformers.AutoTokenizer.from_pretrained(out).decode(hf_ids[0]) == TINY_TEXT[:60]


def test_gguf_files_read_back_with_the_right_metadata_shapes_and_values(tmp_path, corpus_file):
    gguf = pytest.importorskip("gguf")
    run = short_run(
        tmp_path, corpus_file, "m", {"kind": "bpe", "vocab_size": 300}, tiny_model_section("modern")
    )
    perturb(run)
    path = export_run(run, tmp_path / "model.gguf", fmt="gguf")
    reader = gguf.GGUFReader(path)

    def field(key: str):
        value = reader.fields[key]
        return value.contents() if hasattr(value, "contents") else value.parts[value.data[0]]

    config, model = run.config.model, run.model("best", "cpu")
    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == config.n_layers
    assert field("llama.context_length") == config.context_length
    assert field("llama.attention.head_count_kv") == config.kv_heads
    assert field("llama.rope.freq_base") == pytest.approx(config.rope_base)
    assert field("tokenizer.ggml.model") == "gpt2"
    assert len(field("tokenizer.ggml.tokens")) == run.tokenizer.vocab_size
    assert field("tokenizer.ggml.eos_token_id") == run.tokenizer.eos_id
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    state = model.state_dict()
    # lmzoo's own RoPE pairs (2i, 2i+1) are llama.cpp's: q and k come out as lmzoo holds them
    torch.testing.assert_close(tensors["blk.1.attn_q.weight"], state["blocks.1.attn.q_proj.weight"])
    torch.testing.assert_close(tensors["blk.0.attn_k.weight"], state["blocks.0.attn.k_proj.weight"])
    torch.testing.assert_close(tensors["token_embd.weight"], state["token_embedding.weight"])
    torch.testing.assert_close(tensors["blk.0.ffn_gate.weight"], state["blocks.0.ff.gate.weight"])
    assert "output.weight" not in tensors  # tied: llama.cpp reuses the embedding


def test_gguf_of_an_imported_qwen3_keeps_its_layout(tmp_path):
    gguf = pytest.importorskip("gguf")
    from lmzoo.interop import import_pretrained

    folder = save_hf_folder("qwen3", tmp_path / "qwen3")
    run = import_pretrained(folder, tmp_path / "runs" / "qwen3")
    reader = gguf.GGUFReader(export_run(run, tmp_path / "q.gguf", fmt="gguf"))
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()
    torch.testing.assert_close(tensors["blk.0.attn_q.weight"], hf["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(
        tensors["blk.1.attn_k_norm.weight"], hf["model.layers.1.self_attn.k_norm.weight"]
    )
    torch.testing.assert_close(tensors["output.weight"], hf["lm_head.weight"])
    assert tensors["token_embd.weight"].shape == hf["model.embed_tokens.weight"].shape  # no <pad> slot
    assert reader.fields["general.architecture"].contents() == "qwen3"


def test_what_has_no_counterpart_is_refused_in_one_line(tmp_path, corpus_file, trained_run):
    from typer.testing import CliRunner

    from lmzoo.cli import app

    runner = CliRunner()
    lstm = runner.invoke(app, ["export", "--run", str(trained_run), "--out", str(tmp_path / "x")])
    assert lstm.exit_code == 2 and len(lstm.output.strip().splitlines()) == 1
    assert "recurrent" in lstm.output and "gpt and modern" in lstm.output
    char = trained_run_of(tmp_path, corpus_file)
    result = runner.invoke(
        app, ["export", "--run", str(char.path), "--out", str(tmp_path / "g"), "--format", "gguf"]
    )
    assert result.exit_code == 2 and "byte-level BPE" in result.output
    result = runner.invoke(
        app, ["export", "--run", str(char.path), "--out", str(tmp_path / "o"), "--format", "onnx"]
    )
    assert result.exit_code == 2 and "--format" in result.output
    post = short_run(
        tmp_path / "p", corpus_file, "post", {"kind": "char"}, tiny_model_section("gpt", norm="post")
    )
    with pytest.raises(CheckpointError, match="post-LN"):
        export_run(post, tmp_path / "post")
    assert not (tmp_path / "x").exists() and not (tmp_path / "post").exists()
    result = runner.invoke(app, ["export", "--run", str(char.path), "--out", str(tmp_path / "ok")])
    assert result.exit_code == 0 and (tmp_path / "ok" / "model.safetensors").is_file()


def trained_run_of(tmp_path: Path, corpus: Path) -> Run:
    return short_run(tmp_path / "c", corpus, "c", {"kind": "char"}, tiny_model_section("modern"))


def test_adapter_runs_are_refused_and_lora_runs_merge(tmp_path, corpus_file):
    base = short_run(tmp_path, corpus_file, "base", {"kind": "char"}, tiny_model_section("gpt"))
    raw = deep_merge(
        base_config_dict(tmp_path / "runs", corpus_file, name="adapter"),
        {"train": {"max_steps": 2}, "finetune": {"method": "adapter", "bottleneck": 4}},
    )
    del raw["model"], raw["tokenizer"]
    adapter = Run.open(train(config_from_dict({**raw, "init_from": str(base.path)}), progress=False))
    with pytest.raises(CheckpointError, match="adapters"):
        export_run(adapter, tmp_path / "a")
