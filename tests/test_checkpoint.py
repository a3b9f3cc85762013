"""Run directories and checkpoints: atomic swaps, crash recovery, shape checks, safe loading."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT, base_config_dict, config_from_dict, load_run, scripted, tiny_model_section

import lmzoo.run.checkpoint as ckpt
from lmzoo.errors import CheckpointError
from lmzoo.io import atomic_write_text
from lmzoo.models import build_model
from lmzoo.run.checkpoint import (
    checkpoint_dir,
    load_train_state,
    load_weights,
    recover_checkpoints,
    save_checkpoint,
)
from lmzoo.training.loop import train

VOCAB = 17


def model_for(name: str = "lstm", seed: int = 0, **extra):
    torch.manual_seed(seed)
    return build_model(tiny_model_section(name, **extra), VOCAB)


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_weights_equal(model, expected: dict[str, torch.Tensor]) -> None:
    actual = model.state_dict()
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def load_into_fresh(path: Path, **extra):
    model = model_for(seed=99, **extra)
    load_weights(model, path / ckpt.WEIGHTS)
    return model


@pytest.fixture
def run_dir(tmp_path) -> Path:
    path = tmp_path / "run"
    path.mkdir()
    return path


def test_save_and_load_round_trip(run_dir):
    model = model_for()
    final = save_checkpoint(
        run_dir, "last", model, info={"step": 7}, train_state={"step": 7, "x": torch.ones(3)}
    )
    assert final == run_dir / "checkpoints" / "last"
    assert sorted(p.name for p in final.iterdir()) == ["info.json", "model.safetensors", "state.pt"]
    assert_weights_equal(load_into_fresh(final), state_of(model))
    info = json.loads((final / "info.json").read_text())
    assert info["step"] == 7 and info["format_version"] == ckpt.FORMAT_VERSION
    state = load_train_state(final / ckpt.STATE)
    assert state["step"] == 7 and torch.equal(state["x"], torch.ones(3))
    # No temporary or backup directories are left behind.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last"]


def test_tied_weights_survive_a_round_trip(run_dir):
    model = model_for("rnn", tie_weights=True, embedding_dim=16, hidden_size=16)
    save_checkpoint(run_dir, "best", model, info={})
    fresh = model_for("rnn", seed=5, tie_weights=True, embedding_dim=16, hidden_size=16)
    load_weights(fresh, run_dir / "checkpoints" / "best" / ckpt.WEIGHTS)
    assert_weights_equal(fresh, state_of(model))
    assert fresh.head.proj.weight is fresh.embedding.weight


def test_overwriting_replaces_the_checkpoint(run_dir):
    save_checkpoint(run_dir, "last", model_for(seed=1), info={"step": 1})
    newer = model_for(seed=2)
    save_checkpoint(run_dir, "last", newer, info={"step": 2})
    assert_weights_equal(load_into_fresh(run_dir / "checkpoints" / "last"), state_of(newer))
    assert ckpt.read_info(run_dir / "checkpoints" / "last")["step"] == 2
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last"]


# ---- failures during a save --------------------------------------------------------------------


def test_failed_weight_write_leaves_last_intact(run_dir, monkeypatch):
    good = model_for(seed=1)
    save_checkpoint(run_dir, "last", good, info={"step": 1}, train_state={"step": 1})

    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_model", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(run_dir, "last", model_for(seed=2), info={"step": 2}, train_state={"step": 2})
    monkeypatch.undo()

    last = run_dir / "checkpoints" / "last"
    assert_weights_equal(load_into_fresh(last), state_of(good))
    assert ckpt.read_info(last)["step"] == 1
    assert load_train_state(last / ckpt.STATE)["step"] == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last"]


def test_failed_state_write_leaves_last_intact(run_dir, monkeypatch):
    good = model_for(seed=1)
    save_checkpoint(run_dir, "last", good, info={"step": 1}, train_state={"step": 1})

    def broken_save(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(CheckpointError, match="could not write checkpoint .*Input/output error"):
        save_checkpoint(run_dir, "last", model_for(seed=2), info={"step": 2}, train_state={"step": 2})
    monkeypatch.undo()
    assert_weights_equal(load_into_fresh(run_dir / "checkpoints" / "last"), state_of(good))


def test_failure_in_the_middle_of_the_swap_restores_last(run_dir, monkeypatch):
    """The worst moment: `last` has been moved aside and the new one cannot be renamed in."""
    good = model_for(seed=1)
    save_checkpoint(run_dir, "last", good, info={"step": 1})
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(src).name == ".last.tmp":
            raise OSError(30, "Read-only file system")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(CheckpointError, match="Read-only file system"):
        save_checkpoint(run_dir, "last", model_for(seed=2), info={"step": 2})
    monkeypatch.undo()
    assert_weights_equal(load_into_fresh(run_dir / "checkpoints" / "last"), state_of(good))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last"]


def test_atomic_write_text_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "config.yaml"
    atomic_write_text(target, "old: 1\n")

    def replace(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(CheckpointError, match=f"could not write {re.escape(str(target))}"):
        atomic_write_text(target, "new: 2\n")
    monkeypatch.undo()
    assert target.read_text() == "old: 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


# ---- recovery after a crash ------------------------------------------------------------------------


def test_recover_restores_old_when_last_is_missing(run_dir):
    good = model_for(seed=3)
    save_checkpoint(run_dir, "last", good, info={"step": 3})
    root = run_dir / "checkpoints"
    os.replace(root / "last", root / ".last.old")  # crash after moving last aside...
    (root / ".last.tmp").mkdir()  # ...with a half-written new checkpoint
    (root / ".last.tmp" / ckpt.WEIGHTS).write_bytes(b"half a file")
    (run_dir / ".config.yaml.tmp-12345").write_text("partial")

    # A read-only lookup already finds the moved-aside checkpoint.
    assert checkpoint_dir(run_dir, "last") == root / ".last.old"

    recover_checkpoints(run_dir)
    assert sorted(p.name for p in root.iterdir()) == ["last"]
    assert not (run_dir / ".config.yaml.tmp-12345").exists()
    assert_weights_equal(load_into_fresh(root / "last"), state_of(good))
    assert ckpt.read_info(root / "last")["step"] == 3


def test_recover_drops_old_when_last_is_complete(run_dir):
    newest = model_for(seed=4)
    save_checkpoint(run_dir, "last", model_for(seed=1), info={"step": 1})
    root = run_dir / "checkpoints"
    shutil.copytree(root / "last", root / ".last.old")
    save_checkpoint(run_dir, "last", newest, info={"step": 2})
    shutil.copytree(root / "last", root / ".last.old", dirs_exist_ok=True)
    recover_checkpoints(run_dir)
    assert sorted(p.name for p in root.iterdir()) == ["last"]
    assert_weights_equal(load_into_fresh(root / "last"), state_of(newest))


def test_recover_on_a_run_without_checkpoints_is_a_no_op(run_dir):
    recover_checkpoints(run_dir)
    assert list(run_dir.iterdir()) == []


# ---- loading into the wrong model ------------------------------------------------------------------


def test_loading_into_a_different_width_names_the_parameter_and_shapes(run_dir):
    small = model_for(hidden_size=16)
    save_checkpoint(run_dir, "last", small, info={})
    wide = model_for(hidden_size=32)
    with pytest.raises(CheckpointError) as info:
        load_weights(wide, run_dir / "checkpoints" / "last" / ckpt.WEIGHTS)
    message = str(info.value)
    assert "\n" not in message
    match = re.search(r": (\S+) has shape (\(.*?\)) in the checkpoint but (\(.*?\)) in the model", message)
    assert match, message
    key, saved_shape, model_shape = match.groups()
    assert saved_shape == str(tuple(small.state_dict()[key].shape))
    assert model_shape == str(tuple(wide.state_dict()[key].shape))
    assert saved_shape != model_shape


def test_loading_another_family_is_refused(run_dir):
    save_checkpoint(run_dir, "last", model_for("rnn"), info={})
    with pytest.raises(CheckpointError, match="no place in this model"):
        load_weights(model_for("lstm"), run_dir / "checkpoints" / "last" / ckpt.WEIGHTS)


def test_missing_weights_are_refused(run_dir):
    save_checkpoint(run_dir, "last", model_for(num_layers=1), info={})
    with pytest.raises(CheckpointError, match=r"no weights for 'layers\.1\."):
        load_weights(model_for(num_layers=2), run_dir / "checkpoints" / "last" / ckpt.WEIGHTS)


def test_not_a_safetensors_file(tmp_path):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"definitely not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_weights(model_for(), bogus)


# ---- the training state is data, never code --------------------------------------------------------


class Payload:
    """Unpickling this would create the sentinel file."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


def test_pickle_payload_in_state_is_refused(tmp_path):
    sentinel = tmp_path / "pwned"
    state_path = tmp_path / "state.pt"
    torch.save({"format_version": 1, "step": 3, "evil": Payload(sentinel)}, state_path)
    assert not sentinel.exists()
    with pytest.raises(CheckpointError) as info:
        load_train_state(state_path)
    message = str(info.value)
    assert "refused to load training state" in message and "\n" not in message
    assert "refused global" in message and "open" in message  # names what it refused
    assert "weights_only" not in message  # never suggests the unsafe way round
    assert not sentinel.exists()


def test_foreign_pickle_protocol_is_refused_without_warnings(tmp_path):
    sentinel = tmp_path / "pwned"
    state_path = tmp_path / "state.pt"
    state_path.write_bytes(pickle.dumps({"format_version": 1, "evil": Payload(sentinel)}, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's multi-line protocol warning must not reach the user
        with pytest.raises(CheckpointError, match="refused to load training state"):
            load_train_state(state_path)
    assert not sentinel.exists()


def test_train_state_format_checks(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_train_state(tmp_path / "missing.pt")
    plain = tmp_path / "plain.pt"
    torch.save({"step": 1}, plain)
    with pytest.raises(CheckpointError, match="not an lmzoo training state"):
        load_train_state(plain)
    future = tmp_path / "future.pt"
    torch.save({"format_version": 99}, future)
    with pytest.raises(CheckpointError, match="newer"):
        load_train_state(future)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_train_state(damaged)


# ---- which weights `best` keeps ------------------------------------------------------------------------


def lm_scores(losses: list[float]) -> list[dict[str, float]]:
    return [{"loss": loss, "ppl": math.exp(loss), "tokens": 100.0} for loss in losses]


def test_best_holds_the_lowest_validation_loss(make_config, monkeypatch):
    snapshots: list[dict[str, torch.Tensor]] = []
    # evaluations at steps 2, 4, ..., 12; the lowest loss comes at step 8, after a rise and before two
    scripted(
        monkeypatch,
        "lmzoo.training.tasks.lm.evaluate_stream",
        lm_scores([3.0, 2.5, 2.7, 2.2, 2.4, 2.3]),
        snapshots,
    )
    run_dir = train(make_config({"train": {"max_steps": 12, "eval_every": 2}}), progress=False)
    best, last = load_run(run_dir, "best"), load_run(run_dir, "last")
    assert best.info["step"] == 8 and best.info["val_loss"] == 2.2 and best.info["best_metric"] == "loss"
    assert_weights_equal(best.model, snapshots[3])  # the weights evaluated at step 8
    assert last.info["step"] == 12 and last.info["best_score"] == 2.2
    assert not torch.equal(best.model.layers[0].weight_hh_l0, last.model.layers[0].weight_hh_l0)


def test_best_by_bleu_holds_the_highest_bleu_not_the_lowest_loss(tmp_path, monkeypatch):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{s}\t{s[::-1]}\n" for s in TINY_TEXT.splitlines()), encoding="utf-8")
    raw = base_config_dict(tmp_path / "runs", pairs)
    raw["data"] = {"format": "tsv", "train": str(pairs), "batch_size": 4, "max_len": 32}
    raw["model"] = tiny_model_section("seq2seq")
    raw["train"].update(max_steps=8, eval_every=2, best_metric="bleu", bleu_sentences=2)
    snapshots: list[dict[str, torch.Tensor]] = []
    # the loss falls at every evaluation; BLEU peaks at the second (step 4)
    scripted(
        monkeypatch,
        "lmzoo.training.tasks.seq2seq.evaluate_seq2seq",
        lm_scores([3.0, 2.5, 2.0, 1.5]),
        snapshots,
    )
    scripted(monkeypatch, "lmzoo.training.tasks.seq2seq.corpus_bleu", [10.0, 30.0, 20.0, 25.0])
    monkeypatch.setattr(
        "lmzoo.training.tasks.seq2seq.translate_corpus", lambda model, sources, *a, **k: [""] * len(sources)
    )
    run_dir = train(config_from_dict(raw), progress=False)
    best = load_run(run_dir, "best")
    assert best.info["step"] == 4 and best.info["best_metric"] == "bleu"
    assert best.info["val_bleu"] == 30.0 and best.info["val_loss"] == 2.5
    assert_weights_equal(best.model, snapshots[1])
    assert load_run(run_dir, "last").info["best_score"] == 30.0
