"""Importing Hugging Face checkpoints: the imported model computes what `transformers` computes
(logits to 1e-4 in fp32, the same greedy tokens), works with every verb as a normal run, fine-tunes
from `init_from: hf:DIR`, and a checkpoint lmzoo cannot take is refused in one line naming why."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import config_from_dict, deep_merge, read_metrics
from hf_models import KINDS, TEXT, save_hf_folder

from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.interop import import_pretrained
from lmzoo.run import Run
from lmzoo.training.loop import train

transformers = pytest.importorskip("transformers")

PROMPT = "To be, or not to be"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {kind: save_hf_folder(kind, root / kind) for kind in KINDS}


@pytest.fixture(scope="module")
def imported(folders, tmp_path_factory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("imported")
    runs = {kind: import_pretrained(folder, root / kind) for kind, folder in folders.items()}
    for run in runs.values():
        run.config.train.precision = "fp32"  # compared with transformers in fp32 (auto may pick bf16)
    return runs


def reference(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_imported_logits_equal_transformers(kind, folders, imported):
    run = imported[kind]
    ids = run.tokenizer.encode(TEXT[:150])
    hf_ids = transformers.AutoTokenizer.from_pretrained(folders[kind])(TEXT[:150], add_special_tokens=False)
    assert [i - 1 for i in ids] == hf_ids["input_ids"]  # the same tokens, shifted by lmzoo's <pad> slot
    with torch.no_grad():
        ours = run.model("best", "cpu")(torch.tensor([ids]))[0]  # (1, T, V + 1)
        theirs = reference(folders[kind])(torch.tensor([hf_ids["input_ids"]])).logits  # (1, T, V)
    assert theirs.std() > 0.5  # logits spread enough that a misplaced weight shows
    torch.testing.assert_close(ours[..., 1:], theirs, rtol=0, atol=1e-4)
    assert bool((ours[..., 0] < theirs.min() - 1e30).all())  # the <pad> slot is never predicted
    # and the probabilities are the model's own: the extra slot takes no mass
    torch.testing.assert_close(ours.log_softmax(-1)[..., 1:], theirs.log_softmax(-1), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_equals_transformers_over_64_tokens(kind, folders, imported):
    run = imported[kind]
    steps = run.decode(PROMPT, greedy=True, max_new_tokens=64, ignore_eos=True, device="cpu")
    ours = [step.id - 1 for step in steps]
    model = reference(folders[kind])
    prompt = torch.tensor([[i - 1 for i in run.tokenizer.encode(PROMPT)]])
    config = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=64, eos_token_id=None, pad_token_id=0
    )
    with torch.no_grad():
        theirs = model.generate(prompt, generation_config=config)[0, prompt.shape[1] :].tolist()
    assert len(ours) == 64
    assert ours == theirs


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_an_imported_model_exports_back_to_what_it_was(kind, folders, imported, tmp_path):
    from lmzoo.interop import export_run

    out = export_run(imported[kind], tmp_path / kind)
    ids = torch.tensor([transformers.AutoTokenizer.from_pretrained(out)(PROMPT)["input_ids"]])
    with torch.no_grad():
        again = reference(out)(ids).logits
        torch.testing.assert_close(again, reference(folders[kind])(ids).logits, rtol=0, atol=1e-4)
    assert reference(out).config.rope_parameters["rope_type"] == ("llama3" if kind == "llama3" else "default")


def test_the_imported_tokenizer_keeps_its_special_tokens(imported):
    gpt2, llama = imported["gpt2"].tokenizer, imported["llama"].tokenizer
    end = gpt2.backend.token_to_id("<|endoftext|>") + 1
    assert gpt2.bos_id == gpt2.eos_id == end and gpt2.end_ids == (end,) and gpt2.pad_id == 0
    assert (llama.bos_id, llama.eos_id) == (1, 2)  # <s>=0 and </s>=1 in the folder, shifted by one
    assert gpt2.decode(gpt2.encode(TEXT)) == TEXT
    assert gpt2.encode("<|endoftext|>") == [end]  # a special token in text is that token, as in transformers
    assert gpt2.special_name(end) == "<|endoftext|>" and gpt2.never_generated == (0,)


def test_every_verb_works_on_an_imported_run(imported, tmp_path):
    run = imported["llama"]
    text = TEXT[:120]
    scored = run.score(text, device="cpu")
    model = run.model("best", "cpu")
    ids = torch.tensor([run.tokenizer.encode(text)])
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(ids)[0][0, :-1], ids[0, 1:])
    assert scored.loss == pytest.approx(float(expected), rel=1e-4)
    data = tmp_path / "eval.txt"
    data.write_text(text, encoding="utf-8")
    assert run.evaluate(data=data, device="cpu")["loss"] == pytest.approx(float(expected), rel=1e-4)
    sampled = "".join(run.generate(PROMPT, max_new_tokens=12, seed=3, device="cpu"))
    assert sampled == "".join(run.generate(PROMPT, max_new_tokens=12, seed=3, device="cpu"))
    cached = [s.id for s in run.decode(PROMPT, greedy=True, max_new_tokens=20, cache="static", device="cpu")]
    dynamic = [s.id for s in run.decode(PROMPT, greedy=True, max_new_tokens=20, device="cpu")]
    assert cached == dynamic


def finetune_config(tmp_path: Path, folder: Path, name: str, extra: dict) -> dict:
    corpus = tmp_path / "text.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    raw = {
        "name": name,
        "out_dir": str(tmp_path / "runs"),
        "seed": 0,
        "init_from": f"hf:{folder}",
        "data": {"train": str(corpus), "batch_size": 4, "seq_len": 16},
        "train": {
            "max_steps": 6,
            "eval_every": 6,
            "eval_batches": 2,
            "log_every": 1,
            "warmup_steps": 0,
            "lr": 1e-2,
            "device": "cpu",
            "precision": "fp32",
        },
    }
    return deep_merge(raw, extra)


def test_init_from_hf_imports_once_and_lora_fine_tunes(folders, tmp_path):
    raw = finetune_config(tmp_path, folders["gpt2"], "lora", {"finetune": {"method": "lora", "r": 4}})
    config = config_from_dict(raw)
    base = Path(config.init_from)
    assert base == tmp_path / "runs" / "gpt2" and Run.open(base).info()["imported_from"]
    assert Path(config_from_dict(raw).init_from) == base  # reused while the folder is unchanged
    run_dir = train(config, progress=False)
    losses = [r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert losses[-1] < losses[0]
    assert {p.name for p in (run_dir / "checkpoints" / "best").iterdir()} >= {"adapter.safetensors"}
    (folders["gpt2"] / "config.json").touch()  # a changed folder is imported again
    try:
        assert Path(config_from_dict(raw).init_from) == tmp_path / "runs" / "gpt2-2"
    finally:
        shutil.rmtree(tmp_path / "runs" / "gpt2-2", ignore_errors=True)


def test_dpo_and_sft_on_an_imported_model(folders, tmp_path):
    pairs = [{"prompt": "To be, or ", "chosen": "not to be", "rejected": "sea arrows"}] * 8
    prefs = tmp_path / "pairs.jsonl"
    prefs.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    raw = finetune_config(
        tmp_path,
        folders["qwen3"],
        "dpo",
        {
            "data": {"format": "preference", "train": str(prefs), "val": str(prefs), "seq_len": None},
            "finetune": {"method": "lora", "r": 4},
            "train": {"lr": 3e-2, "dpo_beta": 0.5},
        },
    )
    records = read_metrics(train(config_from_dict(raw), progress=False))
    val = [r for r in records if "val/reward_accuracy" in r]
    assert val[0]["val/loss"] == pytest.approx(math.log(2), rel=1e-5)  # policy == reference at step 0
    assert val[-1]["val/reward_accuracy"] == 1.0 and val[-1]["val/loss"] < math.log(2)
    records = [{"instruction": "Continue.", "input": "To be, or", "output": " not to be"}] * 8
    sft_file = tmp_path / "sft.jsonl"
    sft_file.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    raw = finetune_config(
        tmp_path,
        folders["qwen3"],
        "sft",
        {"data": {"format": "instruct", "train": str(sft_file), "val": str(sft_file), "seq_len": None}},
    )
    losses = [
        r["train/loss"]
        for r in read_metrics(train(config_from_dict(raw), progress=False))
        if "train/loss" in r
    ]
    assert losses[-1] < losses[0]


# ---- what is refused, in one line ----------------------------------------------------------------------


def copy_folder(folders: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    target = tmp_path / f"{kind}-copy"
    shutil.copytree(folders[kind], target)
    return target


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def one_line_error(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_pickled_weights_and_unknown_architectures_are_refused(folders, tmp_path):
    pickled = copy_folder(folders, "gpt2", tmp_path)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError) as info:
        import_pretrained(pickled, tmp_path / "out")
    assert "pytorch_model.bin" in one_line_error(info) and "pickle" in one_line_error(info)
    bert = copy_folder(folders, "llama", tmp_path)
    edit_config(bert, model_type="bert")
    with pytest.raises(CheckpointError) as info:
        import_pretrained(bert, tmp_path / "out")
    assert (
        "'bert'" in one_line_error(info)
        and "qwen3" in one_line_error(info)
        and "gpt2" in one_line_error(info)
    )
    scaled = copy_folder(folders, "llama", tmp_path / "s")
    edit_config(scaled, rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None)
    with pytest.raises(CheckpointError) as info:
        import_pretrained(scaled, tmp_path / "out")
    assert "yarn" in one_line_error(info)
    assert not (tmp_path / "out").exists()


def test_corrupted_and_mismatched_checkpoints_are_named(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    wide = copy_folder(folders, "llama", tmp_path / "a")
    edit_config(wide, intermediate_size=64)  # the weights were saved at 48
    with pytest.raises(CheckpointError) as info:
        import_pretrained(wide, tmp_path / "out")
    assert "mlp.gate_proj.weight" in one_line_error(info) and "(48, 32)" in one_line_error(info)
    missing = copy_folder(folders, "gpt2", tmp_path / "b")
    tensors = load_file(str(missing / "model.safetensors"))
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    save_file(tensors, str(missing / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        import_pretrained(missing, tmp_path / "out")
    assert "transformer.h.1.mlp.c_fc.bias" in one_line_error(info) and "missing" in one_line_error(info)
    corrupt = copy_folder(folders, "qwen2", tmp_path / "c")
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError) as info:
        import_pretrained(corrupt, tmp_path / "out")
    assert "model.safetensors" in one_line_error(info)
    extra = copy_folder(folders, "qwen2", tmp_path / "d")
    edit_config(extra, num_hidden_layers=1)  # a second layer's tensors with no place to go
    with pytest.raises(CheckpointError) as info:
        import_pretrained(extra, tmp_path / "out")
    assert "model.layers.1." in one_line_error(info)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError) as info:
        import_pretrained(folders["gpt2"], tmp_path / "out", context_length=4096)
    assert "128 positions" in one_line_error(info)


def test_cli_import_and_its_errors(folders, tmp_path):
    from typer.testing import CliRunner

    from lmzoo.cli import app

    runner = CliRunner()
    out = tmp_path / "runs" / "gpt2"
    result = runner.invoke(app, ["import", str(folders["gpt2"]), "--out", str(out), "--context-length", "64"])
    assert result.exit_code == 0, result.output
    assert Run.open(out).config.model.context_length == 64
    result = runner.invoke(app, ["import", str(folders["gpt2"]), "--out", str(out)])
    assert result.exit_code == 2 and result.output.strip().startswith("error:")
    assert len(result.output.strip().splitlines()) == 1 and "--out" in result.output
    result = runner.invoke(app, ["import", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "not a directory" in result.output
