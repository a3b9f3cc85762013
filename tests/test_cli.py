"""The `lmzoo` command line, driven through typer's CliRunner (runs land in tmp_path)."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import yaml
from conftest import TINY_TEXT, base_config_dict, load_run
from typer.testing import CliRunner

from lmzoo import __version__
from lmzoo.cli import app
from lmzoo.generate import SamplingOptions, generate
from lmzoo.models import list_models
from lmzoo.run import Run
from lmzoo.tracking import read_metrics


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working directory with a corpus and a tiny config `tiny.yaml` (no name: it comes from the file)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text(TINY_TEXT, encoding="utf-8")
    raw = base_config_dict(tmp_path / "unused", tmp_path / "corpus.txt")
    del raw["name"], raw["out_dir"]  # defaults: the file stem, ./runs
    raw["data"]["train"] = "corpus.txt"
    raw["train"].update(max_steps=6, eval_every=3)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    return tmp_path


def assert_one_error_line(result, *, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_train_writes_the_run_directory(runner, project):
    result = runner.invoke(app, ["train", "tiny.yaml", "--no-progress"])
    assert result.exit_code == 0, result.output
    run = project / "runs" / "tiny"
    for relative in [
        "config.yaml",
        "tokenizer.json",
        "metrics.jsonl",
        "checkpoints/last/model.safetensors",
        "checkpoints/last/state.pt",
        "checkpoints/last/info.json",
        "checkpoints/best/model.safetensors",
        "checkpoints/best/info.json",
    ]:
        assert (run / relative).is_file(), relative
    assert not (run / "checkpoints" / "best" / "state.pt").exists()
    assert list(run.glob("events.out.tfevents.*"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["name"] == "tiny" and saved["data"]["seq_len"] == 8 and saved["train"]["max_steps"] == 6
    assert load_run(run, "last").info["step"] == 6
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert "done: runs/tiny" in result.stderr


def test_train_overrides_device_and_resume(runner, project):
    result = runner.invoke(
        app, ["train", "tiny.yaml", "train.max_steps=2", "model.hidden_size=12", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    run = project / "runs" / "tiny"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["hidden_size"] == 12 and saved["train"]["max_steps"] == 2
    assert load_run(run, "last").model.layers[0].hidden_size == 12
    result = runner.invoke(
        app, ["train", "tiny.yaml", "train.max_steps=4", "model.hidden_size=12", "--resume"]
    )
    assert result.exit_code == 0, result.output
    assert load_run(run, "last").info["step"] == 4
    assert not (project / "runs" / "tiny-2").exists()


def test_train_with_an_unknown_key_is_one_error_line(runner, project):
    raw = yaml.safe_load((project / "tiny.yaml").read_text())
    raw["model"]["hidden_sise"] = 16
    (project / "tiny.yaml").write_text(yaml.safe_dump(raw))
    line = assert_one_error_line(runner.invoke(app, ["train", "tiny.yaml"]))
    assert "model.hidden_sise" in line and "did you mean 'hidden_size'" in line
    assert not (project / "runs").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "missing.yaml"], "config file not found"),
        (["train", "tiny.yaml", "train.lr"], "section.key=value"),
        (["train", "tiny.yaml", "train.lr=-1"], "train.lr"),
        (["generate", "--run", "nowhere", "--seed", "x"], "run directory not found"),
        (["eval"], "no trained run found"),
    ],
)
def test_user_errors_are_one_line(runner, project, args, expected):
    assert expected in assert_one_error_line(runner.invoke(app, args))


def test_generate_prints_the_seed_then_the_continuation(runner, trained_run):
    args = [
        "generate",
        "--run",
        str(trained_run),
        "--seed",
        "the ",
        "--greedy",
        "--max-new-tokens",
        "20",
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run = load_run(trained_run, "best")
    expected = "".join(
        generate(run.model, run.tokenizer, "the ", SamplingOptions(max_new_tokens=20, greedy=True))
    )
    assert result.stdout == "the " + expected + "\n"
    assert len(expected) > 0
    assert runner.invoke(app, args).stdout == result.stdout  # greedy: the same again


def test_generate_with_seed_rng_is_reproducible(runner, trained_run):
    args = [
        "generate",
        "-r",
        str(trained_run),
        "-s",
        "a",
        "--max-new-tokens",
        "30",
        "--temperature",
        "1.2",
        "--device",
        "cpu",
        "--num-samples",
        "2",
    ]
    first = runner.invoke(app, [*args, "--seed-rng", "5"])
    again = runner.invoke(app, [*args, "--seed-rng", "5"])
    assert first.exit_code == 0, first.output
    assert first.stdout == again.stdout
    samples = first.stdout.split("\n---\n")
    assert len(samples) == 2 and all(s.startswith("a") for s in samples)
    others = {runner.invoke(app, [*args, "--seed-rng", str(seed)]).stdout for seed in (6, 7, 8)}
    assert len(others | {first.stdout}) > 1


def test_generate_stop_and_option_checks(runner, trained_run):
    base = ["generate", "--run", str(trained_run), "--seed", "the", "--greedy", "--device", "cpu"]
    full = runner.invoke(app, [*base, "--max-new-tokens", "40"]).stdout
    stop = full[len("the") + 2 : len("the") + 4]
    cut = runner.invoke(app, [*base, "--max-new-tokens", "40", "--stop", stop]).stdout
    assert cut == full[: full.index(stop, len("the"))] + "\n"
    line = assert_one_error_line(runner.invoke(app, [*base, "--top-p", "1.5"]))
    assert "top_p" in line


def test_generate_interactive_prompt(runner, trained_run):
    result = runner.invoke(
        app,
        ["generate", "--run", str(trained_run), "--greedy", "--max-new-tokens", "5", "--device", "cpu"],
        input="the\nexit\n",
    )
    assert result.exit_code == 0, result.output
    assert "seed> the" in result.stdout


def test_eval_prints_loss_and_ppl(runner, trained_run):
    result = runner.invoke(app, ["eval", "--run", str(trained_run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    match = re.search(r"loss (\d+\.\d+)\s+ppl (\d+\.\d+)\s+\(([\d,]+) tokens\)", result.stdout)
    assert match, result.stdout
    loss, ppl = float(match.group(1)), float(match.group(2))
    assert ppl == pytest.approx(math.exp(loss), rel=2e-3)
    expected = Run.open(trained_run).evaluate(device="cpu")
    assert loss == pytest.approx(expected["loss"], abs=1e-4)
    assert int(match.group(3).replace(",", "")) == int(expected["tokens"])
    assert "(best) on the val split" in result.stdout


def test_eval_on_a_file(runner, trained_run, tmp_path):
    data = tmp_path / "held_out.txt"
    data.write_text("the cat sat on the mat.\n" * 3, encoding="utf-8")
    result = runner.invoke(
        app, ["eval", "--run", str(trained_run), "--data", str(data), "--checkpoint", "last"]
    )
    assert result.exit_code == 0, result.output
    assert f"on {data}" in result.stdout and "ppl" in result.stdout


def test_models_lists_the_families(runner):
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:-1]}
    assert {"rnn", "lstm", "gru"} <= set(rows)
    for info in list_models():
        assert rows[info.name][1] == info.kind
        assert int(rows[info.name][2].replace(",", "")) == info.reference_params()


def test_version_and_help(runner):
    assert runner.invoke(app, ["--version"]).stdout == f"lmzoo {__version__}\n"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and all(
        cmd in result.stdout for cmd in ("train", "generate", "eval", "models")
    )


def test_cli_module_does_not_import_torch():
    result = subprocess.run(
        [sys.executable, "-c", "import lmzoo.cli, sys; sys.exit('torch' in sys.modules)"], capture_output=True
    )
    assert result.returncode == 0, result.stderr.decode() or "lmzoo.cli imported torch"
