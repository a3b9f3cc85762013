"""The reliability suite, part 2: crashes and bad input handled in-process, with trial counts.

    pytest -m reliability

Each test runs every trial or case, then reports "k/N" with the failing ones in pytest's terminal
summary (tests/conftest.py run_trials), then asserts. Real processes killed and signalled are in
tests/test_reliability_processes.py, config fuzzing in tests/test_reliability_configs.py.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import signal
import zipfile
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
    run_trials,
    tiny_model_section,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from lmzoo.cli import app
from lmzoo.config.schema import RunConfig
from lmzoo.data.tokenizer import fit_tokenizer
from lmzoo.errors import LmzooError, TrainingStopped
from lmzoo.inference.decoding import decode
from lmzoo.inference.loaded import LoadedModel
from lmzoo.inference.sampling import SamplingOptions
from lmzoo.inference.text import start_ids
from lmzoo.models import get_model_info, list_models
from lmzoo.training.loop import train

pytestmark = pytest.mark.reliability
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def cli_stderr(result) -> str:
    return getattr(result, "stderr", "") or result.output


def one_error_line(result) -> str:
    """The CLI's answer to a user error: exit code 2 and one `error:` line, no traceback."""
    message = cli_stderr(result).strip()
    assert result.exit_code == 2, (result.exit_code, message[-500:], result.exception)
    assert message.count("\n") == 0 and message.startswith("error:") and "Traceback" not in message, message
    return message


# ---- 1. resume equivalence for every family -----------------------------------------------------------


def family_config(tmp_path: Path, name: str, out: str, sampling: str) -> RunConfig:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    raw = base_config_dict(tmp_path / out, corpus, name=name)
    raw["model"] = tiny_model_section(name, optional={"dropout": 0.3})
    raw["train"].update({"max_steps": 12, "eval_every": 5, "schedule": "cosine"})
    raw["data"]["sampling"] = sampling
    if get_model_info(name).kind == "seq2seq":
        pairs = tmp_path / "pairs.tsv"
        pairs.write_text("".join(f"{s}\t{s[::-1]}\n" for s in TINY_TEXT.splitlines()), encoding="utf-8")
        raw["data"] = {"format": "tsv", "train": str(pairs), "batch_size": 4, "max_len": 32}
    return config_from_dict(raw)


@pytest.mark.parametrize("name", [info.name for info in list_models()])
def test_resume_is_bit_identical_for_every_family(tmp_path, name):
    """2N steps straight == N steps, a signal-free stop, resume, N steps (dropout and shuffling on)."""
    sampling = "sequential" if getattr(get_model_info(name).cls, "carries_state", False) else "random"
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
    from lmzoo.training.setup import setup_training

    per_epoch = setup_training(config).stepper.batches.batches_per_epoch
    assert 6 % per_epoch != 0  # the stop at step 6 falls inside an epoch
    (tmp_path / "mid").mkdir()
    test_resume_is_bit_identical_for_every_family(tmp_path / "mid", "lstm")


# ---- 2. malicious checkpoints ---------------------------------------------------------------------------


class Payload:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def tampered_zip(real: Path, payload: bytes) -> bytes:
    """A real torch.save zip (a checkpoint's state.pt) with its data.pkl replaced by `payload`."""
    out = io.BytesIO()
    with zipfile.ZipFile(real) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for item in source.infolist():
            target.writestr(item, payload if item.filename.endswith("/data.pkl") else source.read(item))
    return out.getvalue()


def resumable_copy(trained_run: Path, out: Path) -> tuple[Path, Path]:
    """A copy of the shared run under `out`, and a config whose `lmzoo train --resume` continues it."""
    run = out / trained_run.name
    shutil.copytree(trained_run, run)
    raw = yaml.safe_load((trained_run / "config.yaml").read_text())
    raw["out_dir"] = str(out)
    raw["train"]["max_steps"] += 2
    config = out / "resume.yaml"
    config.write_text(yaml.safe_dump(raw))
    return run, config


def evil_files(tmp_path: Path) -> dict[str, bytes]:
    sentinel = tmp_path / "PWNED"
    zipped = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "x": Payload(sentinel)}, zipped)
    return {"pickle": pickle.dumps(Payload(sentinel)), "zip": zipped.read_bytes()}


def test_pickle_payloads_in_the_training_state_are_refused_and_never_run(tmp_path, trained_run):
    """state.pt is the one file lmzoo reads with torch.load (weights_only=True): where a pickle could run."""
    sentinel, evil = tmp_path / "PWNED", evil_files(tmp_path)
    real_state = trained_run / "checkpoints" / "last" / "state.pt"
    cases = {
        "raw pickle": evil["pickle"],
        "protocol-0 pickle": pickle.dumps(Payload(sentinel), protocol=0),
        "torch.save zip holding a payload": evil["zip"],
        "the run's own zip-format state.pt, data.pkl replaced": tampered_zip(
            real_state, pickle.dumps(Payload(sentinel), protocol=2)
        ),
    }

    def trial(label: str) -> None:
        run, config = resumable_copy(trained_run, tmp_path / re.sub(r"\W", "_", label))
        (run / "checkpoints" / "last" / "state.pt").write_bytes(cases[label])
        message = one_error_line(CliRunner().invoke(app, ["train", str(config), "--resume", "--no-progress"]))
        assert "refused to load training state" in message and "never runs code" in message, message
        assert not sentinel.exists()

    run_trials(
        "pickle payloads in state.pt (read by torch.load, weights_only=True), through `lmzoo train --resume`: "
        "refused, payload never ran",
        list(cases),
        trial,
    )


def test_files_posing_as_weights_tokenizer_or_config_are_refused(tmp_path, trained_run):
    """Format checks: these loaders (safetensors, JSON, yaml.safe_load) never unpickle; each refuses a
    payload in one line."""
    sentinel, evil = tmp_path / "PWNED", evil_files(tmp_path)
    unknown_kind = {"format": "lmzoo.tokenizer", "version": 1, "kind": "pickle", "data": evil["pickle"].hex()}
    cases = {
        "model.safetensors: a pickle": ("checkpoints/best/model.safetensors", evil["pickle"]),
        "model.safetensors: a torch.save zip": ("checkpoints/best/model.safetensors", evil["zip"]),
        "model.safetensors of last, read by --resume: a torch.save zip": (
            "checkpoints/last/model.safetensors",
            evil["zip"],
        ),
        "adapter.safetensors: a pickle": ("checkpoints/best/adapter.safetensors", evil["pickle"]),
        "adapter.safetensors: a torch.save zip": ("checkpoints/best/adapter.safetensors", evil["zip"]),
        "tokenizer.json: a pickle": ("tokenizer.json", evil["pickle"]),
        "tokenizer.json: an unknown kind": ("tokenizer.json", json.dumps(unknown_kind).encode()),
        "config.yaml: a python object tag": (
            "config.yaml",
            f"!!python/object/apply:os.system ['touch {sentinel}']\n".encode(),
        ),
        "config.yaml: a nested python tag": (
            "config.yaml",
            f"model: !!python/object/apply:os.system ['touch {sentinel}']\n".encode(),
        ),
    }

    def trial(label: str) -> None:
        relative, content = cases[label]
        run, config = resumable_copy(trained_run, tmp_path / re.sub(r"\W", "_", label))
        if relative.endswith("adapter.safetensors"):
            (run / "checkpoints" / "best" / "model.safetensors").unlink()
        (run / relative).write_bytes(content)
        if "--resume" in label:
            args = ["train", str(config), "--resume", "--no-progress"]
        else:
            args = ["generate", "--run", str(run), "--seed", "the", "--max-new-tokens", "3"]
        one_error_line(CliRunner().invoke(app, args))
        assert not sentinel.exists()

    run_trials(
        "payloads posing as safetensors weights or adapters, tokenizer.json, config.yaml: refused with one line",
        list(cases),
        trial,
    )


def test_no_unsafe_loading_in_the_source():
    source = "\n".join(p.read_text() for p in (ROOT / "lmzoo").rglob("*.py"))
    assert "weights_only=False" not in source and "pickle.load" not in source
    assert "yaml.load(" not in source and "torch.load(" in source  # every torch.load passes weights_only=True
    for call in re.findall(r"torch\.load\([^)]*\)", source):
        assert "weights_only=True" in call


# ---- 3. mismatches ---------------------------------------------------------------------------------------


def test_mismatched_tokenizer_or_config_names_the_parameter_and_shapes(tmp_path, trained_run):
    def vocabulary(run: Path) -> None:
        fit_tokenizer(load_run(trained_run).config.tokenizer, "abcxyz\n").save(run / "tokenizer.json")

    def width(run: Path) -> None:
        raw = yaml.safe_load((run / "config.yaml").read_text())
        raw["model"]["hidden_size"] = 24
        (run / "config.yaml").write_text(yaml.safe_dump(raw))

    def family(run: Path) -> None:
        raw = yaml.safe_load((run / "config.yaml").read_text())
        raw["model"] = tiny_model_section("gpt")
        (run / "config.yaml").write_text(yaml.safe_dump(raw))

    cases = {
        "vocabulary": (
            vocabulary,
            r"embedding\.weight has shape \(\d+, 8\) in the checkpoint but \(\d+, 8\) in the model",
        ),
        "width": (width, r"has shape \(\d+, \d+\) in the checkpoint but \(\d+, \d+\) in the model"),
        "family": (family, r"(shape|no place in this model|no weights for)"),
    }

    def trial(label: str) -> None:
        change, pattern = cases[label]
        run = tmp_path / label
        shutil.copytree(trained_run, run)
        change(run)
        args = ["generate", "--run", str(run), "--seed", "the", "--max-new-tokens", "2"]
        message = one_error_line(CliRunner().invoke(app, args))
        assert re.search(pattern, message), message

    run_trials(
        "mismatched tokenizer / width / family: one-line errors naming the parameter", list(cases), trial
    )


# ---- 4. bad data, before any model is built ---------------------------------------------------------------


def bad_data_cases(tmp_path: Path) -> dict[str, tuple[dict, str]]:
    """label -> (config, the error it must end with); every file is written under tmp_path."""

    def text_run(name: str, content: bytes) -> dict:
        path = tmp_path / f"{name}.txt"
        path.write_bytes(content)
        raw = base_config_dict(tmp_path / "runs", path, name=name)
        raw["data"].update(split=[1.0, 0.0, 0.0], val=str(path))
        return raw

    cases = {
        "empty": (text_run("empty", b""), "empty"),
        "whitespace": (text_run("whitespace", b"  \n\t\n"), "only whitespace"),
        "latin1": (text_run("latin1", "caf\u00e9\n".encode("latin-1") * 50), "not UTF-8"),
        "short": (text_run("short", b"ab\n"), "fewer than one batch"),
    }
    (tmp_path / "p.de").write_text("a\nb\nc\n")
    (tmp_path / "p.en").write_text("a\nb\n")
    parallel = base_config_dict(tmp_path / "runs", tmp_path / "p.de", name="parallel")
    parallel["data"] = {
        "format": "parallel",
        "train": str(tmp_path / "p"),
        "source": "de",
        "target": "en",
        "max_len": 32,
    }
    parallel["model"] = tiny_model_section("transformer")
    cases["misaligned parallel files"] = (parallel, "3 lines but .* has 2")
    jsonl = tmp_path / "sft.jsonl"
    jsonl.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "a", "output": \n')
    instruct = base_config_dict(tmp_path / "runs", jsonl, name="instruct")
    instruct["data"] = {"format": "instruct", "train": str(jsonl)}
    cases["malformed JSONL"] = (instruct, "line 2: invalid JSON")
    pairs = tmp_path / "long.tsv"
    pairs.write_text("".join(f"{s}\t{s[::-1]}\n" for s in TINY_TEXT.splitlines()), encoding="utf-8")
    long = base_config_dict(tmp_path / "runs", pairs, name="long")
    long["data"] = {"format": "tsv", "train": str(pairs), "max_len": 4}
    long["model"] = tiny_model_section("seq2seq")
    cases["no sentence pair within max_len"] = (long, "no sentence pairs within data.max_len")
    return cases


def test_bad_data_fails_before_a_model_is_built(tmp_path, monkeypatch):
    built: list[object] = []

    def trap(*args, **kwargs):
        built.append(args)
        raise AssertionError("a model was built for bad data")

    monkeypatch.setattr("lmzoo.run.directory.build_model", trap)  # every model of a run is built through here
    monkeypatch.chdir(tmp_path)
    cases = bad_data_cases(tmp_path)

    def trial(label: str) -> None:
        raw, expected = cases[label]
        config = tmp_path / f"{raw['name']}.yaml"
        config.write_text(yaml.safe_dump(raw))
        built.clear()
        result = CliRunner().invoke(app, ["train", str(config), "--no-progress"])
        assert built == [], f"{label}: a model was built before the data error"
        assert re.search(expected, one_error_line(result)), cli_stderr(result)
        assert not (tmp_path / "runs" / raw["name"]).exists()  # nothing written either

    run_trials(
        "bad data: one error line before any model is built (model building trapped)", list(cases), trial
    )


# ---- 5. NaN guard ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nonfinite_loss_stops_or_skips_without_saving_it(make_config, monkeypatch, policy):
    from lmzoo.training.objectives import LMObjective

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


# ---- 6. context overflow ----------------------------------------------------------------------------------


def test_prompts_from_empty_to_twice_the_context_generate(make_config):
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
    model, tokenizer, fed = run.model, run.tokenizer, []
    forward = model.forward

    def recording(ids, *args, **kwargs):
        fed.append(ids[0].tolist())
        return forward(ids, *args, **kwargs)

    model.forward = recording
    options = SamplingOptions(max_new_tokens=20, greedy=True, ignore_eos=True)

    def trial(length: int) -> None:
        prompt = "the cat sat on the mat"[:length]
        fed.clear()
        steps = list(decode(LoadedModel(model, tokenizer), prompt, options))
        assert fed[0] == (tokenizer.encode(prompt) or start_ids(tokenizer))[-8:]  # the last `context` tokens
        generated = [step.id for step in steps]
        assert len(generated) == 20 and all(len(ids) == 1 for ids in fed[1:])  # every token asked for
        assert [ids[0] for ids in fed[1:]] == generated[:-1]  # each fed back, the last one needs no step
        assert "".join(step.text for step in steps) == tokenizer.decode(generated)

    run_trials(
        "prompts of 0..16 tokens at context 8: the last 8 kept, 20 new tokens generated and streamed",
        range(17),
        trial,
    )


# ---- 7. tokenizer properties ------------------------------------------------------------------------------

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


# ---- 8. disk full / read-only run directory ------------------------------------------------------------------


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
