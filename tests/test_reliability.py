"""The reliability suite: nothing lost under crashes, signals and bad input, with trial counts.

    pytest -m reliability

Each test reports its figure (e.g. "SIGKILL during training: 50/50 resumed") in pytest's
terminal summary. Trials run real `python -m lmzoo train` processes where the behaviour is about
processes (kills, signals); everything else runs in-process to stay fast.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    TINY_TEXT,
    base_config_dict,
    config_from_dict,
    load_run,
    report_figure,
    tiny_model_section,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from lmzoo import checkpoint as ckpt
from lmzoo.checkpoint import load_train_state
from lmzoo.cli import app
from lmzoo.config.load import config_to_yaml
from lmzoo.config.schema import RunConfig
from lmzoo.errors import CheckpointError, ConfigError, DataError, LmzooError, TrainingStopped
from lmzoo.generate import SamplingOptions, generate
from lmzoo.models import list_models
from lmzoo.run import load_config
from lmzoo.tokenizers import fit_tokenizer
from lmzoo.train import train

pytestmark = pytest.mark.reliability
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def cli_stderr(result) -> str:
    return getattr(result, "stderr", "") or result.output


# ---- helpers for real training processes ---------------------------------------------------------


def write_process_config(tmp_path: Path, name: str, **train_extra) -> Path:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(TINY_TEXT * 4, encoding="utf-8")
    raw = base_config_dict(tmp_path / "runs", corpus, name=name)
    raw["model"] = {"name": "lstm", "embedding_dim": 32, "hidden_size": 64, "num_layers": 2, "dropout": 0.1}
    raw["train"].update({"max_steps": 400, "eval_every": 1000, "checkpoint_every": 1, **train_extra})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start_training(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "lmzoo", "train", str(config), "--no-progress", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=config.parent,
    )


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


# ---- 1. crash during checkpoint writes -------------------------------------------------------------


def test_sigkill_at_random_moments_leaves_a_loadable_resumable_checkpoint(tmp_path):
    trials, resumed = 50, 0
    rng = random.Random(0)
    for trial in range(trials):
        name = f"crash{trial}"
        config = write_process_config(tmp_path, name)
        run_dir = tmp_path / "runs" / name
        process = start_training(config)
        wait_for(lambda r=run_dir, p=process: (r / "checkpoints" / "last").exists() or p.poll() is not None)
        time.sleep(rng.uniform(0.0, 0.6))  # checkpoints are written every step: kills land inside writes too
        process.kill()
        process.wait(timeout=30)
        last = ckpt.checkpoint_dir(run_dir, "last")  # the newest complete checkpoint (mid-swap included)
        for final in (run_dir / "checkpoints").iterdir():  # nothing partial under a final name
            if not final.name.startswith("."):
                assert (final / "info.json").is_file() and (final / "model.safetensors").is_file()
        step = load_run(run_dir, "last").info["step"]
        assert load_train_state(last / "state.pt")["step"] == step
        cfg = load_config(config, [f"train.max_steps={step + 2}", "train.checkpoint_every=1"])
        train(cfg, resume=True, progress=False)
        assert load_run(run_dir, "last").info["step"] == step + 2
        leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
        leftovers += [p.name for p in run_dir.glob(".*.tmp-*")]
        assert leftovers == [], leftovers  # temp files are cleaned at the next start
        resumed += 1
    report_figure(f"SIGKILL at random moments (checkpoint every step): {resumed}/{trials} loaded and resumed")
    assert resumed == trials


# ---- 2. signals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_save_at_the_next_step_and_resume_from_it(tmp_path, sig, code):
    trials, good = 20, 0
    rng = random.Random(int(sig))
    for trial in range(trials):
        name = f"{sig.name.lower()}{trial}"
        config = write_process_config(tmp_path, name, checkpoint_every=1000)
        run_dir = tmp_path / "runs" / name
        process = start_training(config)
        target = rng.randint(2, 25)
        wait_for(lambda r=run_dir, t=target, p=process: logged_steps(r) >= t or p.poll() is not None)
        sent = time.monotonic()
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=30)
        elapsed = time.monotonic() - sent
        stopped = re.search(r"interrupted at step (\d+)/", stderr)
        assert process.returncode == code and stopped, stderr[-500:]
        step = int(stopped.group(1))
        assert step >= target and load_run(run_dir, "last").info["step"] == step
        assert elapsed < 30
        cfg = load_config(config, [f"train.max_steps={step + 1}"])
        seen: list[int] = []
        train(cfg, resume=True, progress=False, on_step=lambda s, loss, seen=seen: seen.append(s))
        assert seen == [step + 1]  # the resumed run picks up at the saved step
        good += 1
    report_figure(
        f"{sig.name} at random steps: {good}/{trials} saved at the step boundary, "
        f"exited with {code} within 30 s, resumed from that step"
    )
    assert good == trials


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    config = write_process_config(tmp_path, "twice", checkpoint_every=1000)
    run_dir = tmp_path / "runs" / "twice"
    process = start_training(config)
    wait_for(lambda: logged_steps(run_dir) >= 3)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    start = time.monotonic()
    process.communicate(timeout=30)
    assert process.returncode == 130 and time.monotonic() - start < 10


# ---- 3. resume equivalence for every family -----------------------------------------------------------


def family_config(tmp_path: Path, name: str, out: str, sampling: str) -> RunConfig:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    raw = base_config_dict(tmp_path / out, corpus, name=name)
    raw["model"] = tiny_model_section(name, optional={"dropout": 0.3})
    raw["train"].update({"max_steps": 12, "eval_every": 5, "schedule": "cosine"})
    raw["data"]["sampling"] = sampling
    if raw["model"]["name"] in ("seq2seq", "transformer"):
        pairs = tmp_path / "pairs.tsv"
        pairs.write_text("".join(f"{s}\t{s[::-1]}\n" for s in TINY_TEXT.splitlines()), encoding="utf-8")
        raw["data"] = {"format": "tsv", "train": str(pairs), "batch_size": 4, "max_len": 32}
    return config_from_dict(raw)


@pytest.mark.parametrize("name", [info.name for info in list_models()])
def test_resume_is_bit_identical_for_every_family(tmp_path, name):
    """2N steps straight == N steps, a signal-free stop, resume, N steps (dropout and shuffling on)."""
    sampling = "sequential" if name in ("rnn", "lstm", "gru") else "random"
    straight: list[tuple[int, float]] = []
    straight_dir = train(
        family_config(tmp_path, name, "a", sampling),
        progress=False,
        on_step=lambda s, loss: straight.append((s, loss)),
    )
    split: list[tuple[int, float]] = []

    def stop_at_six(step: int, loss: float) -> None:
        split.append((step, loss))
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingStopped):
        train(family_config(tmp_path, name, "b", sampling), progress=False, on_step=stop_at_six)
    resumed_dir = train(
        family_config(tmp_path, name, "b", sampling),
        resume=True,
        progress=False,
        on_step=lambda s, loss: split.append((s, loss)),
    )
    assert split == straight
    a, b = load_run(straight_dir, "last").model.state_dict(), load_run(resumed_dir, "last").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    report_figure(
        f"resume equivalence, {name}: 12 steps straight == 6 + stop + resume + 6 "
        f"(losses and weights bit-identical)"
    )


def test_resume_mid_epoch_of_sequential_batches(tmp_path):
    config = family_config(tmp_path, "lstm", "a", "sequential")
    from lmzoo.train import setup_training

    per_epoch = setup_training(config).stepper.batches.batches_per_epoch
    assert 6 % per_epoch != 0  # the stop at step 6 falls inside an epoch
    (tmp_path / "mid").mkdir()
    test_resume_is_bit_identical_for_every_family(tmp_path / "mid", "lstm")


# ---- 4. malicious checkpoints ---------------------------------------------------------------------------


class Payload:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_malicious_files_are_refused_and_never_run(tmp_path, trained_run):
    sentinel = tmp_path / "PWNED"
    evil = pickle.dumps(Payload(sentinel))
    evil_torch = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "x": Payload(sentinel)}, evil_torch)
    cases = {
        "state.pt: raw pickle": ("checkpoints/last/state.pt", evil),
        "state.pt: torch.save with a code object": ("checkpoints/last/state.pt", evil_torch.read_bytes()),
        "state.pt: protocol-0 pickle": (
            "checkpoints/last/state.pt",
            pickle.dumps(Payload(sentinel), protocol=0),
        ),
        "model.safetensors: pickle": ("checkpoints/best/model.safetensors", evil),
        "model.safetensors: torch.save zip": ("checkpoints/best/model.safetensors", evil_torch.read_bytes()),
        "tokenizer.json: pickle": ("tokenizer.json", evil),
        "tokenizer.json: unknown kind": (
            "tokenizer.json",
            json.dumps(
                {"format": "lmzoo.tokenizer", "version": 1, "kind": "pickle", "data": evil.hex()}
            ).encode(),
        ),
        "config.yaml: python object tag": (
            "config.yaml",
            f"!!python/object/apply:os.system ['touch {sentinel}']\n".encode(),
        ),
        "config.yaml: nested python tag": (
            "config.yaml",
            f"model: !!python/object/apply:os.system ['touch {sentinel}']\n".encode(),
        ),
        "adapter.safetensors: pickle": ("checkpoints/best/adapter.safetensors", evil),
    }
    refused = 0
    runner = CliRunner()
    for label, (relative, content) in cases.items():
        run = tmp_path / label.split(":")[0].replace(".", "_") / re.sub(r"\W", "_", label)
        import shutil

        shutil.copytree(trained_run, run)
        if relative.endswith("adapter.safetensors"):
            (run / "checkpoints" / "best" / "model.safetensors").unlink()
        (run / relative).write_bytes(content)
        if relative.endswith("state.pt"):
            with pytest.raises(CheckpointError) as info:
                load_train_state(run / relative)
            message = str(info.value)
        else:
            result = runner.invoke(
                app, ["generate", "--run", str(run), "--seed", "the", "--max-new-tokens", "3"]
            )
            message = cli_stderr(result)
            assert result.exit_code == 2, (label, message)
            assert message.startswith("error:") and message.strip().count("\n") == 0, (label, message)
        assert "Traceback" not in message and not sentinel.exists(), label
        refused += 1
    report_figure(
        f"malicious checkpoint/tokenizer/config files: {refused}/{len(cases)} refused, payload never ran"
    )
    assert refused == len(cases) == 10


def test_no_unsafe_loading_in_the_source():
    source = "\n".join(p.read_text() for p in (ROOT / "lmzoo").rglob("*.py"))
    assert "weights_only=False" not in source and "pickle.load" not in source
    assert "yaml.load(" not in source and "torch.load(" in source  # every torch.load passes weights_only=True
    for call in re.findall(r"torch\.load\([^)]*\)", source):
        assert "weights_only=True" in call


# ---- 5. config fuzzing -------------------------------------------------------------------------------


def prepared_configs(tmp_path: Path) -> list[Path]:
    """Every shipped config, copied where its init_from base run and data files exist."""
    runs = tmp_path / "runs"
    for base in ("gpt", "lstm", "gpt_bpe"):
        (runs / base).mkdir(parents=True, exist_ok=True)
        (runs / base / "config.yaml").write_text(
            config_to_yaml(load_config(ROOT / "configs" / f"{base}.yaml"))
        )
    copies = []
    for config in CONFIGS:
        target = tmp_path / config.name
        target.write_text(config.read_text())
        copies.append(target)
    return copies


def known_keys(raw: dict) -> dict[str, list[str]]:
    """Section -> its valid keys ("" for the top level), from the validated config (defaults included)."""
    data = config_from_dict(raw).to_dict()
    keys = {section: list(value) for section, value in data.items() if isinstance(value, dict)}
    keys[""] = list(data)
    return keys


def misspell(word: str, rng: random.Random) -> str:
    position = rng.randrange(len(word))
    kind = rng.choice(["delete", "swap", "replace"]) if len(word) > 2 else "replace"
    if kind == "delete":
        return word[:position] + word[position + 1 :]
    if kind == "swap" and position < len(word) - 1 and word[position] != word[position + 1]:
        return word[:position] + word[position + 1] + word[position] + word[position + 2 :]
    letters = [c for c in string.ascii_lowercase if c != word[position]]
    return word[:position] + rng.choice(letters) + word[position + 1 :]


def mutate(raw: dict, rng: random.Random, kind: str) -> tuple[str, str]:
    """Apply one invalid mutation; return (YAML text, the key path the error must name)."""
    raw = json.loads(json.dumps(raw))
    sections = known_keys(raw)
    if kind == "bad yaml":
        return yaml.safe_dump(raw) + "model: [unclosed\n", "line"
    if kind == "missing section":
        for section in ("model", "init_from", "finetune"):  # a fine-tune's model comes from its init_from run
            raw.pop(section, None)
        return yaml.safe_dump(raw), "model"
    if kind == "missing file":
        raw.setdefault("data", {})["train"] = "no/such/corpus.txt"
        return yaml.safe_dump(raw), "data.train"
    section = rng.choice(["data", "train", "sample", "model"])
    raw.setdefault(section, {})
    if kind == "misspelt key":
        key = rng.choice(sections[section])
        wrong = misspell(key, rng)
        while wrong in sections[section] or not wrong:
            wrong = misspell(key, rng)
        raw[section][wrong] = raw[section].pop(key, 1)
        return yaml.safe_dump(raw), f"{section}.{wrong}"
    if kind == "wrong type":
        key = rng.choice(
            [
                k
                for k in (
                    "batch_size",
                    "max_len",
                    "max_steps",
                    "lr",
                    "eval_every",
                    "max_new_tokens",
                    "temperature",
                )
                if k in sections[section]
            ]
            or ["batch_size"]
        )
        section = section if key in sections[section] else "data"
        raw.setdefault(section, {})[key] = rng.choice(["lots", [1, 2], {"a": 1}])
        return yaml.safe_dump(raw), f"{section}.{key}"
    if kind == "negative size":
        key = rng.choice(["batch_size", "max_len"])
        raw.setdefault("data", {})[key] = -rng.randint(1, 50)
        return yaml.safe_dump(raw), f"data.{key}"
    raise ValueError(kind)


KINDS = ["misspelt key", "wrong type", "missing section", "bad yaml", "missing file", "negative size"]


def test_config_fuzzing_every_mutation_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    configs = prepared_configs(tmp_path)
    rng = random.Random(7)
    runner = CliRunner()
    trials, clean = 200, 0
    for trial in range(trials):
        source = rng.choice(configs)
        raw = yaml.safe_load(source.read_text())
        kind = KINDS[trial % len(KINDS)]
        text, key_path = mutate(raw, rng, kind)
        path = tmp_path / f"fuzz{trial}.yaml"
        path.write_text(text)
        result = runner.invoke(app, ["train", str(path), "--no-progress"])
        message = cli_stderr(result).strip()
        assert result.exit_code == 2, (source.name, kind, message)
        assert message.count("\n") == 0 and message.startswith("error:"), (kind, message)
        assert "Traceback" not in message and key_path in message, (source.name, kind, key_path, message)
        clean += 1
    report_figure(
        f"config fuzzing over {len(configs)} shipped configs: {clean}/{trials} mutations ended with "
        "exit code 2 and one error line naming the key"
    )
    assert clean == trials


def test_heads_not_dividing_width_names_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for config, heads in (("gpt.yaml", 3), ("transformer_small.yaml", 3)):
        result = CliRunner().invoke(app, ["train", str(ROOT / "configs" / config), f"model.n_heads={heads}"])
        assert result.exit_code == 2 and "model.n_heads" in cli_stderr(result)


def test_every_one_letter_misspelling_of_every_key_gets_a_did_you_mean(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepared_configs(tmp_path)
    checked = 0
    for config in ("lstm.yaml", "gpt.yaml", "transformer_small.yaml", "gpt_lora.yaml"):
        raw = yaml.safe_load((ROOT / "configs" / config).read_text())
        for section, keys in known_keys(raw).items():
            if section == "tokenizer" and "init_from" in raw:
                continue  # a fine-tune inherits its tokenizer section; writing one is its own error
            for key in keys:
                if len(key) < 3:
                    continue  # no one-letter edit of "lr" or "r" is closer to it than to a different word
                edits = {key[:i] + key[i + 1 :] for i in range(len(key))}
                edits |= {key[:i] + key[i + 1] + key[i] + key[i + 2 :] for i in range(len(key) - 1)}
                edits |= {key[:i] + ("x" if key[i] != "x" else "z") + key[i + 1 :] for i in range(len(key))}
                for wrong in sorted(edits - set(keys)):
                    mutated = json.loads(json.dumps(raw))
                    (mutated.setdefault(section, {}) if section else mutated)[wrong] = 1
                    with pytest.raises(ConfigError) as info:
                        config_from_dict(mutated)
                    path = f"{section}.{wrong}" if section else wrong
                    assert f"{path}: unknown key (did you mean" in str(info.value), str(info.value)
                    checked += 1
    report_figure(f"one-letter misspellings of every key: {checked}/{checked} answered with a 'did you mean'")


# ---- 6. mismatches ---------------------------------------------------------------------------------------


def test_mismatched_tokenizer_or_config_names_the_parameter_and_shapes(tmp_path, trained_run):
    import shutil

    cases = []
    vocab = tmp_path / "vocab"
    shutil.copytree(trained_run, vocab)
    fit_tokenizer(load_run(trained_run).config.tokenizer, "abcxyz\n").save(vocab / "tokenizer.json")
    cases.append(
        (vocab, r"embedding\.weight has shape \(\d+, 8\) in the checkpoint but \(\d+, 8\) in the model")
    )
    width = tmp_path / "width"
    shutil.copytree(trained_run, width)
    raw = yaml.safe_load((width / "config.yaml").read_text())
    raw["model"]["hidden_size"] = 24
    (width / "config.yaml").write_text(yaml.safe_dump(raw))
    cases.append((width, r"has shape \(\d+, \d+\) in the checkpoint but \(\d+, \d+\) in the model"))
    family = tmp_path / "family"
    shutil.copytree(trained_run, family)
    raw["model"] = tiny_model_section("gpt")
    (family / "config.yaml").write_text(yaml.safe_dump(raw))
    cases.append((family, r"(shape|no place in this model|no weights for)"))
    for run, pattern in cases:
        result = CliRunner().invoke(
            app, ["generate", "--run", str(run), "--seed", "the", "--max-new-tokens", "2"]
        )
        message = cli_stderr(result).strip()
        assert result.exit_code == 2 and message.count("\n") == 0 and re.search(pattern, message), message
    report_figure(
        f"mismatched tokenizer / width / family: {len(cases)}/{len(cases)} one-line errors naming the parameter"
    )


# ---- 7. bad data, before any model is built ---------------------------------------------------------------


def test_bad_data_fails_before_a_model_is_built(tmp_path, make_config, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built for bad data")

    monkeypatch.setattr("lmzoo.models.build_model", no_model)
    files = {
        "empty": (b"", "empty"),
        "whitespace": (b"  \n\t\n", "only whitespace"),
        "latin1": ("caf\u00e9\n".encode("latin-1") * 50, "not UTF-8"),
        "short": (b"ab\n", "fewer than one batch"),
    }
    for name, (content, expected) in files.items():
        path = tmp_path / f"{name}.txt"
        path.write_bytes(content)
        with pytest.raises(DataError, match=expected):
            train(
                make_config({"data": {"train": str(path), "split": [1.0, 0.0, 0.0], "val": str(path)}}),
                progress=False,
            )
    src, tgt = tmp_path / "p.de", tmp_path / "p.en"
    src.write_text("a\nb\nc\n")
    tgt.write_text("a\nb\n")
    raw = base_config_dict(tmp_path / "runs", src)
    raw["data"] = {
        "format": "parallel",
        "train": str(tmp_path / "p"),
        "source": "de",
        "target": "en",
        "max_len": 32,
    }
    raw["model"] = tiny_model_section("transformer")
    with pytest.raises(DataError, match="3 lines but .* has 2"):
        train(config_from_dict(raw), progress=False)
    jsonl = tmp_path / "prefs.jsonl"
    jsonl.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n')
    from lmzoo.data import read_records

    with pytest.raises(DataError, match="line 2: invalid JSON"):
        read_records(str(jsonl), ("prompt", "chosen", "rejected"))


# ---- 8. NaN guard ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nonfinite_loss_stops_or_skips_without_saving_it(make_config, monkeypatch, policy):
    from lmzoo.objectives import LMObjective

    original, calls = LMObjective.__call__, {"n": 0}

    def poisoned(self, forward, batch):
        loss, tokens = original(self, forward, batch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 7 else loss), tokens

    monkeypatch.setattr(LMObjective, "__call__", poisoned)
    config = make_config({"train": {"max_steps": 10, "checkpoint_every": 1, "nan_policy": policy}})
    if policy == "stop":
        with pytest.raises(TrainingStopped) as info:
            train(config, progress=False)
        assert info.value.exit_code == 3
        run = load_run(Path(config.out_dir) / config.name, "last")
        assert run.info["step"] == 6  # nothing saved from the NaN step on
        assert all(torch.isfinite(p).all() for p in run.model.parameters())
    else:
        run_dir = train(config, progress=False)
        run = load_run(run_dir, "last")
        assert run.info["step"] == 10 and all(torch.isfinite(p).all() for p in run.model.parameters())
    report_figure(
        f"NaN loss at step 7, nan_policy {policy}: "
        + (
            "stopped with exit code 3, last checkpoint = step 6, loads"
            if policy == "stop"
            else "step skipped, training finished with finite weights"
        )
    )


# ---- 9. context overflow ----------------------------------------------------------------------------------


def test_prompts_from_empty_to_twice_the_context_generate(tmp_path, make_config):
    run = load_run(
        train(
            make_config(
                {
                    "model": tiny_model_section("gpt", context_length=8),
                    "data": {"seq_len": 8, "sampling": "random"},
                    "train": {"max_steps": 3},
                }
            ),
            progress=False,
        )
    )
    options = SamplingOptions(max_new_tokens=20, greedy=True)
    for length in range(0, 17):
        text = "".join(generate(run.model, run.tokenizer, "the cat sat on the mat"[:length], options))
        assert isinstance(text, str)
    report_figure("prompts of 0..16 tokens at context 8, 20 new tokens each: 17/17 generated, no index error")


# ---- 10. tokenizer properties ------------------------------------------------------------------------------

ALPHABET = sorted(set(TINY_TEXT))
CHAR = fit_tokenizer(config_from_dict({"model": {"name": "lstm"}}).tokenizer, TINY_TEXT)
BPE = fit_tokenizer(
    config_from_dict({"model": {"name": "lstm"}, "tokenizer": {"kind": "bpe", "vocab_size": 300}}).tokenizer,
    TINY_TEXT * 5,
)


@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(alphabet=ALPHABET, max_size=60))
def test_char_round_trip_10000_examples(text):
    ids = CHAR.encode(text)
    assert CHAR.decode(ids) == text and all(0 <= i < CHAR.vocab_size for i in ids)


@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(max_size=40))
def test_bpe_round_trip_any_unicode_10000_examples(text):
    ids = BPE.encode(text)
    assert BPE.decode(ids) == text and all(0 <= i < BPE.vocab_size for i in ids)


# ---- 11. disk full / read-only run directory ------------------------------------------------------------------


def test_a_failing_checkpoint_write_keeps_the_previous_one(make_config, monkeypatch):
    import errno

    config = make_config({"train": {"max_steps": 4, "checkpoint_every": 2}})
    run_dir = train(config, progress=False)
    before = load_run(run_dir, "last").info["step"]
    real_replace = os.replace

    def disk_full(src, dst):
        if "checkpoints" in str(dst):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(LmzooError, match="No space left on device"):
        train(make_config({"train": {"max_steps": 8, "checkpoint_every": 2}}), resume=True, progress=False)
    monkeypatch.setattr(os, "replace", real_replace)
    assert load_run(run_dir, "last").info["step"] == before
    report_figure("disk full while checkpointing: one-line error, previous checkpoint intact and loadable")
