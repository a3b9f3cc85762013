"""Fine-tuning end to end with tiny runs: init_from (full, LoRA, adapters), merging, SFT and DPO."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    SENTENCES,
    TINY_TEXT,
    base_config_dict,
    config_from_dict,
    deep_merge,
    load_run,
    read_metrics,
    tiny_model_section,
)
from torch import nn
from typer.testing import CliRunner

from lmzoo.cli import app
from lmzoo.config.schema import RunConfig
from lmzoo.data.batch import PreferenceBatch
from lmzoo.data.example_files import read_records
from lmzoo.data.examples import preference_batch, prompt_response_ids, sft_batch
from lmzoo.data.prepare import prepare_corpus
from lmzoo.data.streams import make_batches
from lmzoo.data.tokenizer import CharTokenizerConfig, fit_tokenizer
from lmzoo.errors import CheckpointError, ConfigError, DataError
from lmzoo.inference.loaded import LoadedModel
from lmzoo.inference.scoring import evaluate_stream
from lmzoo.models.base import PAD_ID, LanguageModel
from lmzoo.models.heads import OutputHead
from lmzoo.models.peft import LoRA, adapters_disabled
from lmzoo.run import Run
from lmzoo.training.loop import train
from lmzoo.training.objectives import DPOObjective, LMObjective, preference_metrics, sequence_logprobs
from lmzoo.training.setup import setup_training

# Fine-tuning text: new sentences made of the base corpus's characters (nothing maps to <unk>).
FINETUNE_TEXT = "".join(line + "\n" for line in ["the bird ate the mat.", "a cat sang on the bone."] * 20)


def _train_base(root: Path, name: str, model: dict) -> Path:
    corpus = root / "corpus.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    raw = base_config_dict(root / "runs", corpus, name=name)
    raw["model"] = model
    raw["train"].update(max_steps=8, eval_every=4)
    return train(config_from_dict(raw), progress=False)


@pytest.fixture(scope="module")
def base_lstm(tmp_path_factory) -> Path:
    """A tiny trained LSTM run to fine-tune (read-only)."""
    return _train_base(
        tmp_path_factory.mktemp("base_lstm"), "base", base_config_dict(Path(), Path())["model"]
    )


@pytest.fixture(scope="module")
def base_gpt(tmp_path_factory) -> Path:
    """A tiny trained GPT run (context 32) for SFT and DPO (read-only)."""
    return _train_base(tmp_path_factory.mktemp("base_gpt"), "base_gpt", tiny_model_section("gpt"))


def finetune_dict(base: Path, tmp_path: Path, name: str, extra: dict | None = None) -> dict:
    """A fine-tune config: no model or tokenizer section (both come from `base`)."""
    corpus = tmp_path / "finetune.txt"
    if not corpus.exists():
        corpus.write_text(FINETUNE_TEXT, encoding="utf-8")
    raw = {
        "name": name,
        "out_dir": str(tmp_path / "ft_runs"),
        "seed": 7,
        "init_from": str(base),
        "data": {"train": str(corpus), "batch_size": 4, "seq_len": 8},
        "train": {
            "max_steps": 6,
            "eval_every": 3,
            "eval_batches": 2,
            "log_every": 1,
            "warmup_steps": 0,
            "schedule": "constant",
            "lr": 2e-2,
            "device": "cpu",
            "precision": "fp32",
        },
        "sample": {"max_new_tokens": 5},
    }
    return deep_merge(raw, extra or {})


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def first_batch_loss(model: nn.Module, config: RunConfig, tokenizer) -> float:
    """The loss of `model` on the first training batch a run with `config` draws (sequential LSTM batches)."""
    stream = prepare_corpus(config.data, tokenizer).tokens("train")
    batch = make_batches(
        stream, config.data.batch_size, config.seq_len, sequential=True, seed=config.seed
    ).next()
    with torch.no_grad():
        return float(model(batch.inputs, None, targets=batch.targets)[0])


def val_loss(model: nn.Module, config: RunConfig, tokenizer) -> float:
    """What a run's evaluate() computes on its validation split."""
    stream = prepare_corpus(config.data, tokenizer).tensor("val")
    readable = LoadedModel(model, tokenizer, window=config.seq_len, batch_size=config.data.eval_rows)
    return evaluate_stream(readable, stream, max_tokens=config.eval_tokens)["loss"]


# ---- 7. init_from -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["full", "lora", "adapter"])
def test_finetune_starts_from_the_base_weights_and_writes_its_own_run(base_lstm, tmp_path, method):
    base_before = tree_digest(base_lstm)
    base = load_run(base_lstm)
    finetune = {"method": method, "r": 2, "alpha": 4.0, "bottleneck": 4}
    config = config_from_dict(finetune_dict(base_lstm, tmp_path, f"ft_{method}", {"finetune": finetune}))
    assert config.model == base.config.model and config.tokenizer == base.config.tokenizer  # inherited

    # Step 0: the fine-tune's own evaluation gives the base model's loss on the fine-tuning data.
    setup = setup_training(config)
    expected = val_loss(base.model, config, base.tokenizer)
    assert setup.task.evaluate().values["loss"] == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert setup.task.tokenizer.to_dict() == base.tokenizer.to_dict()

    run_dir = train(config, progress=False)
    assert run_dir == tmp_path / "ft_runs" / f"ft_{method}"
    assert tree_digest(base_lstm) == base_before  # the base run is never written to
    # The first logged loss is the base model's loss on the first fine-tuning batch.
    records = read_metrics(run_dir)
    first = next(r for r in records if "train/loss" in r)
    assert first["step"] == 1
    assert first["train/loss"] == pytest.approx(
        first_batch_loss(base.model, config, base.tokenizer), rel=1e-6
    )
    trainable = next(r for r in records if "params/trainable" in r)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["init_from"] == str(base_lstm) and saved["finetune"]["method"] == method

    files = {str(p.relative_to(run_dir / "checkpoints")) for p in run_dir.rglob("*.safetensors")}
    if method == "full":
        assert files == {"last/model.safetensors", "best/model.safetensors"}
        assert trainable["params/trainable"] == trainable["params/total"]
    else:
        assert files == {"last/adapter.safetensors", "best/adapter.safetensors"}
        assert trainable["params/trainable"] < 0.3 * trainable["params/total"]
        base_size = (base_lstm / "checkpoints" / "best" / "model.safetensors").stat().st_size
        assert (run_dir / "checkpoints" / "last" / "adapter.safetensors").stat().st_size < 0.3 * base_size

    # load_run rebuilds the fine-tuned model: its validation loss is the one logged during training.
    loaded = load_run(run_dir)
    assert loaded.info["val_loss"] == pytest.approx(
        val_loss(loaded.model, config, loaded.tokenizer), rel=1e-6
    )
    assert loaded.info["val_loss"] < expected  # it learned something from the new text
    best_step = loaded.info["step"]
    assert next(
        r["val/loss"] for r in records if r.get("step") == best_step and "val/loss" in r
    ) == pytest.approx(loaded.info["val_loss"], rel=1e-9)
    if method != "full":
        base_weights = base.model.state_dict()
        for name, tensor in loaded.model.state_dict().items():
            plain = name.replace("parametrizations.", "").replace(".original", "").replace(".inner.", ".")
            if plain in base_weights:  # every frozen tensor is the base run's
                assert torch.equal(tensor, base_weights[plain]), name
        if method == "lora":
            assert sum(isinstance(m, LoRA) for m in loaded.model.modules()) == 2
            with torch.no_grad(), adapters_disabled(loaded.model):
                ids = torch.tensor([base.tokenizer.encode("the cat")])
                torch.testing.assert_close(loaded.model(ids)[0], base.model(ids)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_lora_and_adapter_runs_resume_exactly(base_lstm, tmp_path, method):
    """A run whose checkpoints hold only adapter.safetensors is still found by --resume (and as the newest run)."""

    def config(out: str, steps: int) -> RunConfig:
        return config_from_dict(
            finetune_dict(
                base_lstm,
                tmp_path,
                "ft",
                {
                    "out_dir": str(tmp_path / out),
                    "finetune": {"method": method, "r": 2},
                    "train": {"max_steps": steps, "eval_every": 3},
                },
            )
        )

    straight = train(config("straight", 6), progress=False)
    first = train(config("split", 3), progress=False)
    assert Run.latest(tmp_path / "split") == first
    assert Run.open(None, runs_dir=tmp_path / "split").path == first
    resumed = train(config("split", 6), resume=True, progress=False)
    assert resumed == first
    assert [r["train/loss"] for r in read_metrics(resumed) if "train/loss" in r] == [
        r["train/loss"] for r in read_metrics(straight) if "train/loss" in r
    ]
    a, b = load_run(straight, "last").model.state_dict(), load_run(resumed, "last").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(resumed.rglob("model.safetensors"))


def test_init_from_errors_are_one_line(base_lstm, tmp_path):
    def error(raw: dict, kind=ConfigError) -> str:
        with pytest.raises(kind) as info:
            config_from_dict(raw)
        message = str(info.value)
        assert "\n" not in message and "Traceback" not in message
        return message

    missing = tmp_path / "no_such_run"
    assert f"init_from: {missing}" in error(finetune_dict(missing, tmp_path, "x"))
    message = error(finetune_dict(base_lstm, tmp_path, "x", {"tokenizer": {"kind": "word"}}))
    assert "tokenizer" in message and "init_from" in message
    message = error(finetune_dict(base_lstm, tmp_path, "x", {"model": {"hidden_size": 32}}))
    assert "model.hidden_size" in message and "32" in message and "16" in message
    message = error(finetune_dict(base_lstm, tmp_path, "x", {"model": {"name": "gru"}}))
    assert "model.name" in message
    no_base = finetune_dict(base_lstm, tmp_path, "x", {"finetune": {"method": "lora"}})
    del no_base["init_from"]
    no_base["model"] = {"name": "lstm"}
    assert "finetune" in error(no_base) and "init_from" in error(no_base)

    # Restating the base run's sections (as a copied base config does) is not a conflict; dropout may change.
    same = finetune_dict(
        base_lstm,
        tmp_path,
        "x",
        {
            "model": {**base_config_dict(Path(), Path())["model"], "dropout": 0.25},
            "tokenizer": {"kind": "char"},
        },
    )
    config = config_from_dict(same)
    assert config.model.dropout == 0.25 and config.model.hidden_size == 16 and config.tokenizer.kind == "char"


def test_init_from_a_run_that_disappeared_or_is_a_lora_run(base_lstm, tmp_path):
    import shutil

    base_copy = tmp_path / "base_copy"
    shutil.copytree(base_lstm, base_copy)
    lora = train(
        config_from_dict(
            finetune_dict(
                base_copy,
                tmp_path,
                "lora",
                {"finetune": {"method": "lora", "r": 2}, "train": {"max_steps": 2}},
            )
        ),
        progress=False,
    )
    # A LoRA run cannot be the base of another fine-tune until it is merged.
    with pytest.raises(CheckpointError) as info:
        train(config_from_dict(finetune_dict(lora, tmp_path, "again")), progress=False)
    assert "merge it first" in str(info.value) and "\n" not in str(info.value)
    # Without its base, a LoRA run cannot be rebuilt: one line naming the missing run.
    shutil.rmtree(base_copy)
    with pytest.raises(CheckpointError) as info:
        load_run(lora)
    assert str(base_copy) in str(info.value) and "\n" not in str(info.value)


def test_a_moved_base_is_found_again_or_named(base_lstm, tmp_path, monkeypatch):
    """base.json stores the base relative to the run (a moved runs/ folder still works) and a hash of its
    weights; a base moved elsewhere gets one line naming where it was looked for, and --base fixes it."""
    import shutil

    from lmzoo.cli import app

    project = tmp_path / "project"
    shutil.copytree(base_lstm, project / "runs" / "base")
    monkeypatch.chdir(project)
    raw = finetune_dict(Path("runs/base"), tmp_path, "lora", {"finetune": {"method": "lora", "r": 2}})
    lora = train(config_from_dict({**raw, "out_dir": "runs"}), progress=False)
    expected = load_run(lora, "last").model.state_dict()
    # The whole project moves: the relative record still finds the base.
    shutil.move(project, tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "moved")
    moved = load_run(Path("runs") / "lora", "last").model.state_dict()
    assert all(torch.equal(moved[k], expected[k]) for k in expected)
    # The base alone moves: one line naming where it was looked for; --base points at it.
    shutil.move(Path("runs/base"), tmp_path / "elsewhere")
    runner = CliRunner()
    result = runner.invoke(app, ["generate", "--run", "runs/lora", "--seed", "the", "--max-new-tokens", "3"])
    assert result.exit_code == 2 and "base run (init_from) is missing" in result.stderr
    assert "runs/base" in result.stderr and "--base" in result.stderr and result.stderr.count("\n") == 1
    args = ["generate", "--run", "runs/lora", "--seed", "the", "--max-new-tokens", "3", "--greedy"]
    result = runner.invoke(app, [*args, "--base", str(tmp_path / "elsewhere")])
    assert result.exit_code == 0, result.stderr
    # Another run's weights are not accepted as the base.
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "elsewhere", other)
    from safetensors.torch import load_file, save_file

    weights = other / "checkpoints" / "best" / "model.safetensors"
    tensors = {k: v + 1 for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights))
    result = runner.invoke(app, [*args, "--base", str(other)])
    assert result.exit_code == 2 and "weights differ" in result.stderr


# ---- 2. merging a LoRA run through the CLI -------------------------------------------------------------


def test_cli_merge_writes_a_plain_run_with_the_same_outputs(base_lstm, tmp_path):
    runner = CliRunner()
    lora_dir = train(
        config_from_dict(
            finetune_dict(base_lstm, tmp_path, "lora", {"finetune": {"method": "lora", "r": 2, "alpha": 8.0}})
        ),
        progress=False,
    )
    result = runner.invoke(app, ["merge", "--run", str(lora_dir)])
    assert result.exit_code == 0, result.output
    merged = tmp_path / "ft_runs" / "lora-merged"
    assert f"merged: {merged}" in result.stdout
    config = yaml.safe_load((merged / "config.yaml").read_text())
    assert config["init_from"] is None and config["finetune"] is None and config["name"] == "lora-merged"
    assert (merged / "checkpoints" / "best" / "model.safetensors").is_file()
    assert not list(merged.rglob("adapter.safetensors"))
    assert (merged / "tokenizer.json").read_text() == (lora_dir / "tokenizer.json").read_text()

    adapted, plain = load_run(lora_dir), load_run(merged)
    assert not any(isinstance(m, LoRA) for m in plain.model.modules())
    ids = torch.tensor([adapted.tokenizer.encode("the cat sat on the mat.")])
    with torch.no_grad():
        torch.testing.assert_close(plain.model(ids)[0], adapted.model(ids)[0], rtol=0, atol=1e-5)
        assert not torch.allclose(adapted.model(ids)[0], load_run(base_lstm).model(ids)[0], atol=1e-3)
    # The merged run samples what the LoRA run samples.
    outputs = [
        runner.invoke(
            app,
            [
                "generate",
                "--run",
                str(run),
                "--seed",
                "the ",
                "--greedy",
                "--max-new-tokens",
                "20",
                "--device",
                "cpu",
            ],
        )
        for run in (lora_dir, merged)
    ]
    assert outputs[0].exit_code == 0 and outputs[0].stdout == outputs[1].stdout

    # Adapters (and full fine-tunes) cannot be merged: one error line.
    adapter_dir = train(
        config_from_dict(
            finetune_dict(
                base_lstm, tmp_path, "adapter", {"finetune": {"method": "adapter"}, "train": {"max_steps": 2}}
            )
        ),
        progress=False,
    )
    for run, words in ((adapter_dir, "adapters"), (merged, "not a LoRA run")):
        result = runner.invoke(app, ["merge", "--run", str(run)])
        assert result.exit_code == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr
    assert not (tmp_path / "ft_runs" / "adapter-merged").exists()


# ---- 6. SFT --------------------------------------------------------------------------------------------


@pytest.fixture
def char_tokenizer():
    return fit_tokenizer(CharTokenizerConfig(), "abcdefghijklmnopqrstuvwxyz ")


def test_prompt_response_ids_mask_the_prompt_and_crop_from_the_left(char_tokenizer):
    tok = char_tokenizer
    enc, eos = tok.encode, tok.eos_id
    inputs, targets = prompt_response_ids(tok, "abc", "xy", 32)
    assert inputs == enc("abcxy") and targets == [PAD_ID, PAD_ID] + enc("xy") + [eos]
    # Too long for the context (6): the prompt loses its start, the response stays whole.
    inputs, targets = prompt_response_ids(tok, "abcdefgh", "xy", 6)
    assert inputs == enc("efghxy") and targets == [PAD_ID] * 3 + enc("xy") + [eos]
    # A response longer than the context keeps its first `context` tokens after the last prompt token.
    inputs, targets = prompt_response_ids(tok, "abcdefgh", "uvwxyzuvw", 6)
    assert inputs == enc("huvwxy") and targets == enc("uvwxyz")
    # No context limit: nothing is cropped; an empty prompt starts from <bos>.
    inputs, targets = prompt_response_ids(tok, "a" * 50, "b", None)
    assert len(inputs) == 51 and targets == [PAD_ID] * 49 + enc("b") + [eos]
    inputs, targets = prompt_response_ids(tok, "", "ab", 8)
    assert inputs == [tok.bos_id] + enc("ab") and targets == enc("ab") + [eos]


class BigramLM(LanguageModel):
    """The prediction at position t depends on token t alone: a prompt token only reaches the loss
    through its own label and the prediction it makes for the next position."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, 6)
        self.head = OutputHead(6, vocab)

    def hidden(self, ids, state=None):
        return self.embedding(ids), None


def sft_loss(model, tokenizer, rows: list[tuple[str, str]]) -> torch.Tensor:
    batch = sft_batch([prompt_response_ids(tokenizer, p, r, None) for p, r in rows])
    with torch.no_grad():
        loss, _ = LMObjective(carry=False)(model, batch)
    return loss


def test_sft_loss_ignores_prompt_labels(char_tokenizer):
    tok = char_tokenizer
    torch.manual_seed(0)
    model = BigramLM(tok.vocab_size)
    prompt, response = "abcdef", "xyz"
    reference = sft_loss(model, tok, [(prompt, response), ("hij", "klmno")])
    # The loss is the mean over response tokens (and <eos>) only, padding of the shorter row excluded.
    with torch.no_grad():
        total, count = 0.0, 0
        for p, r in [(prompt, response), ("hij", "klmno")]:
            ids = tok.encode(p + r) + [tok.eos_id]
            logp = model(torch.tensor([ids[:-1]]))[0][0].log_softmax(-1)
            for t in range(len(p) - 1, len(ids) - 1):
                total -= float(logp[t, ids[t + 1]])
                count += 1
    assert float(reference) == pytest.approx(total / count, rel=1e-6)
    # Changing a prompt token whose label and prediction are both prompt positions: same loss.
    for position in range(len(prompt) - 1):
        changed = prompt[:position] + "q" + prompt[position + 1 :]
        assert torch.equal(sft_loss(model, tok, [(changed, response), ("hij", "klmno")]), reference), position
    # The last prompt token predicts the first response token; response tokens are labels: both count.
    assert not torch.equal(sft_loss(model, tok, [(prompt[:-1] + "q", response), ("hij", "klmno")]), reference)
    for position in range(len(response)):
        changed = response[:position] + "q" + response[position + 1 :]
        assert not torch.equal(sft_loss(model, tok, [(prompt, changed), ("hij", "klmno")]), reference), (
            position
        )


def test_read_records_names_the_bad_line_or_record(tmp_path):
    fields = ("prompt", "chosen", "rejected")
    good = json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})
    cases = [
        ("bad.jsonl", f'{good}\n\n{{"prompt": "a",\n{good}\n', "line 3: invalid JSON"),
        (
            "missing.jsonl",
            f"{good}\n{json.dumps({'prompt': 'a', 'chosen': 'b'})}\n",
            "line 2: field 'rejected' is missing",
        ),
        (
            "number.jsonl",
            f"\n{json.dumps({'prompt': 'a', 'chosen': 1, 'rejected': 'c'})}\n",
            "line 2: field 'chosen'",
        ),
        ("list.jsonl", f"{good}\n[1, 2]\n", "line 2: expected an object"),
        (
            "array.json",
            json.dumps([json.loads(good), {"prompt": "a", "rejected": "c"}]),
            "record 2: field 'chosen'",
        ),
        ("broken.json", '[\n{"prompt": "a"},\n{"prompt" "b"}\n]', "line 3: invalid JSON"),
        ("empty.jsonl", "\n\n  \n", "only whitespace"),
    ]
    for filename, text, words in cases:
        path = tmp_path / filename
        path.write_text(text, encoding="utf-8")
        with pytest.raises(DataError) as info:
            read_records(str(path), fields)
        message = str(info.value)
        assert words in message and str(path) in message and "\n" not in message, (filename, message)
    # `input` may be left out of instruction records; it reads as "".
    path = tmp_path / "instruct.jsonl"
    path.write_text(json.dumps({"instruction": "say hi", "output": "hi"}) + "\n", encoding="utf-8")
    assert read_records(str(path), ("instruction", "input", "output")) == [
        {"instruction": "say hi", "input": "", "output": "hi"}
    ]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_sft_end_to_end_scores_only_responses(base_gpt, tmp_path):
    records = [{"instruction": s.split(" ")[1], "input": "", "output": s} for s in SENTENCES] * 4
    train_file = write_jsonl(tmp_path / "sft.jsonl", records)
    val_file = write_jsonl(tmp_path / "sft_val.jsonl", records[:3])
    template = "{instruction}\n"  # every sequence fits the context of 32
    raw = finetune_dict(
        base_gpt,
        tmp_path,
        "sft",
        {
            "data": {
                "format": "instruct",
                "train": str(train_file),
                "val": str(val_file),
                "template": template,
                "seq_len": None,
            },
            "finetune": {"method": "full"},
            "train": {"max_steps": 4, "eval_every": 4, "lr": 1e-2},
        },
    )
    config = config_from_dict(raw)
    base = load_run(base_gpt)
    setup = setup_training(config)
    # Step 0: the validation loss is the base model's mean NLL of the response tokens given the prompts.
    total, count = 0.0, 0
    with torch.no_grad():
        for record in records[:3]:
            prompt = template.format(instruction=record["instruction"], input="")
            ids = base.tokenizer.encode(prompt + record["output"]) + [base.tokenizer.eos_id]
            logp = base.model(torch.tensor([ids[:-1]]))[0][0].log_softmax(-1)
            for t in range(len(base.tokenizer.encode(prompt)) - 1, len(ids) - 1):
                total -= float(logp[t, ids[t + 1]])
                count += 1
    metrics = setup.task.evaluate().values
    assert metrics["tokens"] == count
    assert metrics["loss"] == pytest.approx(total / count, rel=1e-5)
    run_dir = train(config, progress=False)
    losses = [r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert load_run(run_dir).info["val_loss"] < metrics["loss"]


# ---- 5. DPO --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nll", [0.0, 0.7])
def test_dpo_loss_matches_a_hand_computation(nll):
    """Two pairs over a 3-token vocabulary; a fake policy whose logits we choose, fixed reference log-probs."""
    ln2 = math.log(2.0)
    # rows: chosen 0, chosen 1, rejected 0, rejected 1; targets: PAD (0) or tokens 1/2
    targets = torch.tensor([[PAD_ID, 1], [PAD_ID, 2], [2, 1], [PAD_ID, 1]])
    logits = torch.zeros(4, 2, 3)
    logits[0, 1] = torch.tensor([0.0, ln2, 0.0])  # p(1) = 1/2
    logits[1, 1] = torch.tensor([0.0, 0.0, 0.0])  # p(2) = 1/3
    logits[2, 0] = torch.tensor([0.0, 0.0, ln2])  # p(2) = 1/2
    logits[2, 1] = torch.tensor([0.0, 0.0, 0.0])  # p(1) = 1/3
    logits[3, 1] = torch.tensor([ln2, ln2, 0.0])  # p(1) = 2/5
    logits[[0, 1, 3], 0] = torch.tensor([7.0, -3.0, 1.0])  # masked positions: must not matter
    policy_param = logits.clone().requires_grad_(True)
    seen = {}

    class ChosenLogits(LanguageModel):
        """A policy whose hidden states are the chosen logits and whose output layer is the identity."""

        def __init__(self) -> None:
            super().__init__()
            self.head = OutputHead(3, 3, bias=False)
            self.head.proj.weight.data = torch.eye(3)

        def hidden(self, ids, state=None):
            return policy_param * 1.0, None

    forward = ChosenLogits()

    def reference(inputs, targets):
        seen["grad_enabled"] = torch.is_grad_enabled()
        seen["shape"] = tuple(targets.shape)
        return torch.tensor([-1.0, -0.5, -2.0, -1.5])

    beta = 0.5
    objective = DPOObjective(beta, reference, nll)
    inputs = torch.ones(4, 2, dtype=torch.long)
    batch = PreferenceBatch(inputs[:2], targets[:2], inputs[2:], targets[2:])
    loss, tokens = objective(forward, batch)

    policy = [math.log(1 / 2), math.log(1 / 3), math.log(1 / 2) + math.log(1 / 3), math.log(2 / 5)]
    ref = [-1.0, -0.5, -2.0, -1.5]
    rewards = [beta * (p - r) for p, r in zip(policy, ref, strict=True)]
    margins = [rewards[0] - rewards[2], rewards[1] - rewards[3]]
    expected = sum(math.log1p(math.exp(-m)) for m in margins) / 2  # -log sigmoid(m)
    expected -= nll * (policy[0] + policy[1]) / 2  # RPO: the chosen responses' NLL over their 2 tokens
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert tokens == 5
    assert seen == {"grad_enabled": False, "shape": (4, 2)}
    assert objective.metrics["reward_chosen"] == pytest.approx((rewards[0] + rewards[1]) / 2, rel=1e-6)
    assert objective.metrics["reward_rejected"] == pytest.approx((rewards[2] + rewards[3]) / 2, rel=1e-6)
    assert objective.metrics["reward_margin"] == pytest.approx(sum(margins) / 2, rel=1e-6)
    assert objective.metrics["reward_accuracy"] == (margins[0] > 0) * 0.5 + (margins[1] > 0) * 0.5
    # d loss / d log pi(y_c) = -beta * sigmoid(-m) / 2: check it on the chosen row 0 through the chosen logit
    loss.backward()
    sig = 1 / (1 + math.exp(margins[0]))
    # log pi(1 | row 0, t 1) = l1 - logsumexp: d/dl1 = 1 - p(1) = 1/2
    # the NLL term adds -nll / 2 (its tokens) * d log pi / d l1
    assert float(policy_param.grad[0, 1, 1]) == pytest.approx((-beta * sig / 2 - nll / 2) * 0.5, rel=1e-5)
    assert torch.count_nonzero(policy_param.grad[:, 0][[0, 1, 3]]) == 0  # masked positions get no gradient


@pytest.mark.parametrize("adaptive", [False, True])
def test_sequence_logprobs_sum_the_response_token_log_probabilities(adaptive):
    torch.manual_seed(0)
    model = BigramLM(7).eval()
    if adaptive:  # scored through an adaptive softmax's clusters: logits are its log-probabilities
        model.head = OutputHead(6, 7, adaptive_cutoffs=[3])
    inputs = torch.tensor([[3, 4, 5, 6], [6, 5, 4, 0]])
    targets = torch.tensor([[PAD_ID, 5, 6, 2], [PAD_ID, PAD_ID, 3, PAD_ID]])
    with torch.no_grad():
        got = sequence_logprobs(model, inputs, targets)
        logits = model(inputs)[0]
    expected = []
    for row in range(2):
        total = 0.0
        for t in range(4):
            if targets[row, t] != PAD_ID:
                scores = logits[row, t].tolist()
                norm = math.log(sum(math.exp(s) for s in scores))
                total += scores[int(targets[row, t])] - norm
        expected.append(total)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_preference_metrics_count_ties_as_half():
    chosen = torch.tensor([1.0, 0.0, 2.0, 3.0])
    rejected = torch.tensor([0.0, 0.0, 2.0, 5.0])
    metrics = preference_metrics(chosen, rejected)
    assert metrics == {
        "reward_accuracy": 0.5,
        "reward_margin": -0.25,
        "reward_chosen": 1.5,
        "reward_rejected": 1.75,
    }
    assert preference_metrics(torch.zeros(3), torch.zeros(3))["reward_accuracy"] == 0.5
    assert preference_metrics(torch.ones(2), torch.zeros(2))["reward_accuracy"] == 1.0


def preference_files(tmp_path: Path) -> tuple[Path, Path]:
    pairs = [
        ("the cat sat ", "on the mat.", "ate the bone."),
        ("the dog ate ", "the bone.", "in the tree."),
        ("a bird sang ", "in the tree.", "on the mat."),
    ]
    records = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs]
    train_file = write_jsonl(tmp_path / "pref.jsonl", records * 4)
    val_file = write_jsonl(
        tmp_path / "pref_val.jsonl", records + [{"prompt": "the cat ", "chosen": "sat.", "rejected": "sang."}]
    )
    return train_file, val_file


@pytest.mark.parametrize("method", ["full", "lora", "adapter"])
def test_dpo_reference_stays_frozen_and_starts_equal_to_the_policy(base_gpt, tmp_path, method):
    """With LoRA or adapters the reference is the same model with them switched off; otherwise a frozen copy."""
    train_file, val_file = preference_files(tmp_path)
    raw = finetune_dict(
        base_gpt,
        tmp_path,
        f"dpo_{method}",
        {
            "data": {"format": "preference", "train": str(train_file), "val": str(val_file), "seq_len": None},
            "finetune": {
                "method": method,
                "r": 4,
                "targets": ["*attn.in_proj.weight", "*attn.out_proj.weight"],
            },
            "train": {"max_steps": 3, "eval_every": 3, "lr": 2e-2, "dpo_beta": 0.5},
        },
    )
    config = config_from_dict(raw)
    base = load_run(base_gpt)
    setup = setup_training(config)
    task, objective = setup.task, setup.task.objective

    # Step 0: policy == reference, so every reward is 0, every pair a tie, the loss log 2.
    metrics = task.evaluate().values
    assert metrics["reward_accuracy"] == 0.5
    assert metrics["reward_margin"] == 0.0 and metrics["reward_chosen"] == 0.0
    assert metrics["loss"] == pytest.approx(math.log(2), rel=1e-6)
    # The base run's own validation text: the loss its best checkpoint recorded.
    assert metrics["pretrain_loss"] == pytest.approx(base.info["val_loss"], rel=1e-6)

    val = preference_batch(task.batches.examples[:6])  # training pairs
    inputs = torch.cat([val.chosen_inputs, val.rejected_inputs])
    targets = torch.cat([val.chosen_targets, val.rejected_targets])
    reference_before = objective.reference(inputs, targets)  # called with autograd on
    assert not reference_before.requires_grad
    with torch.no_grad():
        base_logprobs = sequence_logprobs(base.model, inputs, targets)
        policy_before = sequence_logprobs(task.model, inputs, targets)
    torch.testing.assert_close(reference_before, base_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(policy_before, base_logprobs, rtol=0, atol=1e-5)

    task.model.train()
    for _ in range(3):
        result = setup.stepper(config.train.lr)
        assert result.applied and set(result.metrics) >= {"reward_accuracy", "reward_margin"}
    reference_after = objective.reference(inputs, targets)
    with torch.no_grad():
        policy_after = sequence_logprobs(task.model, inputs, targets)
    assert torch.equal(reference_after, reference_before)  # bit-identical: the reference never trains
    assert (policy_after - policy_before).abs().max() > 1e-3  # while the policy did move
    # DPO pushes chosen up relative to rejected: the training pairs' margin grows
    rewards = config.train.dpo_beta * (policy_after - reference_after)
    chosen, rejected = rewards.chunk(2)
    assert float((chosen - rejected).mean()) > 0
    if method != "full":
        assert all(p.grad is None for n, p in task.model.named_parameters() if not p.requires_grad)


def test_dpo_run_logs_rewards_and_saves_only_lora_tensors(base_gpt, tmp_path):
    train_file, val_file = preference_files(tmp_path)
    config = config_from_dict(
        finetune_dict(
            base_gpt,
            tmp_path,
            "dpo",
            {
                "data": {
                    "format": "preference",
                    "train": str(train_file),
                    "val": str(val_file),
                    "seq_len": None,
                },
                "finetune": {"method": "lora", "r": 4, "targets": ["*attn.in_proj.weight"]},
                "train": {"max_steps": 4, "eval_every": 2, "lr": 2e-2},
            },
        )
    )
    run_dir = train(config, progress=False)
    records = read_metrics(run_dir)
    train_records = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert train_records[0]["train/loss"] == pytest.approx(math.log(2), rel=1e-6)  # policy == reference
    assert train_records[0]["train/reward_accuracy"] == 0.5
    for r in train_records:
        assert 0.0 <= r["train/reward_accuracy"] <= 1.0
    val_records = [r for r in records if "val/reward_accuracy" in r]
    assert [r["step"] for r in val_records] == [0, 2, 4]  # a fine-tune scores its starting point first
    assert all(math.isfinite(r["val/pretrain_loss"]) for r in val_records)
    assert {p.name for p in (run_dir / "checkpoints" / "last").iterdir()} == {
        "adapter.safetensors",
        "state.pt",
        "info.json",
    }
    # preference data needs a reference model
    raw = finetune_dict(base_gpt, tmp_path, "x", {"data": {"format": "preference", "train": str(train_file)}})
    del raw["init_from"]
    raw["model"] = tiny_model_section("gpt")
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert "init_from" in str(info.value)
