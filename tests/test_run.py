"""Run: creating, finding and opening run directories, and the library verbs on a trained run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_run

import lmzoo.run.checkpoint as ckpt
from lmzoo import Run
from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.models import build_model, tiny_model_config
from lmzoo.run.checkpoint import save_checkpoint
from lmzoo.training.rundirs import create


def tiny_lstm() -> torch.nn.Module:
    return build_model(tiny_model_config("lstm"), 17)


# ---- finding runs -------------------------------------------------------------------------------------


def test_create_never_reuses_a_name(make_config, tmp_path):
    config = make_config()
    first, second = create(config), create(config)
    assert (first.path.name, second.path.name) == ("tiny", "tiny-2")
    assert (first.path / "config.yaml").is_file() and (second.path / "config.yaml").is_file()
    assert create(config).path.name == "tiny-3"


def test_latest_and_open(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    assert Run.latest(runs) is None
    for name, stamp in [("exp", 100), ("exp-2", 300), ("exp-other", 400), ("other", 200)]:
        save_checkpoint(runs / name, "last", tiny_lstm(), info={})
        weights = runs / name / "checkpoints" / "last" / ckpt.WEIGHTS
        os.utime(weights, (stamp, stamp))
    (runs / "empty").mkdir()
    assert Run.latest(runs) == runs / "exp-other"
    assert Run.latest(runs, "exp") == runs / "exp-2"  # exp-other is not a numbered exp run
    assert Run.latest(runs, "other") == runs / "other"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="run directory not found"):
        Run.open("nope")
    with pytest.raises(CheckpointError, match="not an lmzoo run"):
        Run.open("runs/empty")


def test_open_by_name_and_newest(trained_run, monkeypatch):
    monkeypatch.chdir(trained_run.parent.parent)
    assert Run.open("shared").path == Path("runs") / "shared"
    assert Run.open(None).path == Path("runs") / "shared"
    assert Run.open(trained_run).kind == "lm"


def test_open_without_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="no trained run found"):
        Run.open(None)


# ---- whole runs ----------------------------------------------------------------------------------------


def test_model_best_and_last(trained_run):
    best, last = load_run(trained_run, "best"), load_run(trained_run, "last")
    assert last.info["step"] == 30
    assert not best.model.training
    assert best.tokenizer.vocab_size == best.model.embedding.num_embeddings
    assert best.config.name == "shared"
    with pytest.raises(ConfigError, match="checkpoint_tag must be best or last"):
        load_run(trained_run, "middle")


def test_best_falls_back_to_last(tmp_path, trained_run):
    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy)
    shutil.rmtree(copy / "checkpoints" / "best")
    assert load_run(copy, "best").info["step"] == 30


def test_a_run_loads_without_its_corpus(tmp_path, trained_run):
    """A run directory is self-contained: sampling from it never needs the training text."""
    moved = tmp_path / "moved"
    shutil.copytree(trained_run, moved)
    config = yaml.safe_load((moved / "config.yaml").read_text())
    config["data"]["train"] = str(tmp_path / "gone" / "corpus.txt")
    (moved / "config.yaml").write_text(yaml.safe_dump(config))
    run, expected = load_run(moved, "last"), load_run(trained_run, "last")
    for name, tensor in expected.model.state_dict().items():
        assert torch.equal(run.model.state_dict()[name], tensor), name


def test_the_library_verbs_match_the_model(trained_run):
    """run.generate streams what the sampler makes of the model; run.evaluate is the token-weighted loss."""
    from conftest import generate

    run = Run.open(trained_run)
    greedy = "".join(run.generate("the ", max_new_tokens=12, greedy=True, device="cpu"))
    options = run.sampling(max_new_tokens=12, greedy=True)
    assert greedy == "".join(generate(run.model("best", "cpu"), run.tokenizer, "the ", options))
    assert len(run.tokenizer.encode(greedy)) == 12
    assert options.temperature == run.config.sample.temperature  # run defaults fill what is not given
    with pytest.raises(ConfigError, match="temperature"):
        run.sampling(temperature=-1.0)
    metrics = run.evaluate(device="cpu")
    assert metrics["loss"] > 0 and abs(metrics["ppl"] - torch.tensor(metrics["loss"]).exp().item()) < 1e-3
