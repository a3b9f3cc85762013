"""The training loop: learning, exact resume, graceful interruption, run directories."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT, load_run, read_metrics, tiny_model_section

from lmzoo.config import TrainConfig
from lmzoo.errors import ConfigError, DataError, TrainingStopped
from lmzoo.models import list_models
from lmzoo.run.checkpoint import load_train_state
from lmzoo.training.loop import train
from lmzoo.training.optim import lr_at

LM_MODELS = [info.name for info in list_models() if info.kind == "lm"]


def run_and_record(config, **kwargs) -> tuple[list[tuple[int, float]], object]:
    losses: list[tuple[int, float]] = []
    run_dir = train(config, progress=False, on_step=lambda step, loss: losses.append((step, loss)), **kwargs)
    return losses, run_dir


def weights(run_dir, tag: str = "last") -> dict[str, torch.Tensor]:
    return load_run(run_dir, tag=tag).model.state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def test_loss_falls_on_a_repetitive_corpus(make_config):
    config = make_config(
        {
            "model": {"hidden_size": 32, "embedding_dim": 16},
            "train": {
                "max_steps": 60,
                "eval_every": 30,
                "lr": 2e-2,
                "warmup_steps": 0,
                "schedule": "constant",
            },
        }
    )
    losses, run_dir = run_and_record(config)
    assert [step for step, _ in losses] == list(range(1, 61))
    train_losses = [r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert len(train_losses) == 60
    assert train_losses == pytest.approx([loss for _, loss in losses])
    first, last = train_losses[0], train_losses[-1]
    assert first == pytest.approx(math.log(4 + len(set(TINY_TEXT))), abs=0.5)  # about uniform at the start
    assert last < 0.5 * first, (first, last)
    vals = [r["val/loss"] for r in read_metrics(run_dir) if "val/loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0]


@pytest.mark.parametrize(
    ("model_name", "sampling"),
    [(name, "auto") for name in LM_MODELS] + [("lstm", "random")],
)
def test_resume_is_exactly_equivalent_to_a_straight_run(tmp_path, make_config, model_name, sampling):
    """N steps, then a new train(resume=True) up to 2N == 2N steps in one go (CPU, fp32, dropout > 0)."""
    n = 8
    extra = {
        "model": tiny_model_section(model_name, optional={"dropout": 0.3, "num_layers": 2, "n_layers": 2}),
        "data": {"sampling": sampling},
        # constant lr: a run told to stop at N has the same schedule as one going on to 2N
        "train": {"schedule": "constant", "warmup_steps": 0, "eval_every": 5},
    }
    straight_losses, straight_dir = run_and_record(
        make_config({**extra, "train": {**extra["train"], "max_steps": 2 * n}}, out_dir=tmp_path / "straight")
    )
    first_losses, first_dir = run_and_record(
        make_config({**extra, "train": {**extra["train"], "max_steps": n}}, out_dir=tmp_path / "split")
    )
    resumed_losses, resumed_dir = run_and_record(
        make_config({**extra, "train": {**extra["train"], "max_steps": 2 * n}}, out_dir=tmp_path / "split"),
        resume=True,
    )
    assert resumed_dir == first_dir
    assert [s for s, _ in resumed_losses] == list(range(n + 1, 2 * n + 1))
    assert first_losses + resumed_losses == straight_losses  # bit-identical per-step losses
    assert_same_weights(weights(straight_dir), weights(resumed_dir))
    # The resumed run's metrics continue the first part's, without duplicates.
    steps = [r["step"] for r in read_metrics(resumed_dir) if "train/loss" in r]
    assert steps == list(range(1, 2 * n + 1))


def test_sigint_saves_last_and_resume_matches_a_straight_run(tmp_path, make_config):
    k, total = 5, 12
    extra = {"model": {"dropout": 0.2, "num_layers": 2}, "train": {"max_steps": total, "eval_every": 4}}
    straight_losses, straight_dir = run_and_record(make_config(extra, out_dir=tmp_path / "straight"))

    config = make_config(extra, out_dir=tmp_path / "interrupted")
    seen: list[tuple[int, float]] = []

    def interrupt(step: int, loss: float) -> None:
        seen.append((step, loss))
        if step == k:
            os.kill(os.getpid(), signal.SIGINT)

    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingStopped) as info:
        train(config, progress=False, on_step=interrupt)
    assert info.value.exit_code == 130
    assert f"interrupted at step {k}/{total}" in str(info.value) and "Resume with" in str(info.value)
    assert [s for s, _ in seen] == list(range(1, k + 1))  # it stopped at the end of step k

    run_dir = tmp_path / "interrupted" / config.name
    last = load_run(run_dir, tag="last")
    assert last.info["step"] == k
    assert load_train_state(run_dir / "checkpoints" / "last" / "state.pt")["step"] == k
    # The training loop's handler is gone again.
    assert signal.getsignal(signal.SIGINT) is handler_before

    # Cosine schedule with warmup: resuming from the interrupted step reproduces the straight run.
    resumed_losses, resumed_dir = run_and_record(
        make_config(extra, out_dir=tmp_path / "interrupted"), resume=True
    )
    assert resumed_dir == run_dir
    assert seen + resumed_losses == straight_losses
    assert_same_weights(weights(straight_dir), weights(resumed_dir))
    assert load_run(run_dir, tag="last").info["step"] == total
    # One consistent history in both logs, including the step the run was interrupted at.
    for tag in ("train/loss", "val/loss"):
        assert scalar_history(run_dir, tag) == scalar_history(straight_dir, tag), tag
    assert [s for s, _ in scalar_history(run_dir, "train/loss")] == list(range(1, total + 1))
    assert [r["step"] for r in read_metrics(run_dir) if "val/loss" in r] == [4, 8, 12]


def scalar_history(run_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lmzoo.training.tracking import tensorboard_tag

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tensorboard_tag(tag))]


def test_a_second_run_with_the_same_name_gets_a_new_directory(make_config):
    first = train(make_config({"train": {"max_steps": 3}}), progress=False)
    snapshot = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    second = train(make_config({"train": {"max_steps": 4}}), progress=False)
    third = train(make_config({"train": {"max_steps": 2}}), progress=False)
    assert first.name == "tiny" and second.name == "tiny-2" and third.name == "tiny-3"
    assert second.parent == first.parent == third.parent
    assert {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()} == snapshot
    assert load_run(first, "last").info["step"] == 3
    assert load_run(second, "last").info["step"] == 4


def test_resume_picks_the_newest_run_of_that_name(make_config):
    train(make_config({"train": {"max_steps": 2}}), progress=False)
    second = train(make_config({"train": {"max_steps": 2}}), progress=False)
    resumed = train(make_config({"train": {"max_steps": 4}}), resume=True, progress=False)
    assert resumed == second and load_run(second, "last").info["step"] == 4


def test_resume_refuses_a_changed_model(make_config):
    train(make_config({"train": {"max_steps": 2}}), progress=False)
    with pytest.raises(
        ConfigError, match=r"resume: model\.hidden_size is 32 in the config but 16 in the run"
    ):
        train(
            make_config({"model": {"hidden_size": 32}, "train": {"max_steps": 4}}),
            resume=True,
            progress=False,
        )


def test_resume_without_a_checkpoint_starts_the_run(make_config, capsys):
    """A requeued job always passes --resume: with no checkpoint yet, it starts at step 0 (one notice)."""
    run_dir = train(make_config({"train": {"max_steps": 4}}), resume=True, progress=False)
    assert "has no checkpoint" in capsys.readouterr().err
    assert load_run(run_dir, "last").info["step"] == 4
    again = train(make_config({"train": {"max_steps": 6}}), resume=True, progress=False)
    assert again == run_dir and load_run(run_dir, "last").info["step"] == 6


def test_resume_after_a_death_before_the_first_checkpoint_reuses_its_directory(make_config):
    """A job killed before its first checkpoint left runs/tiny without one: --resume starts over there."""
    config = make_config({"train": {"max_steps": 4}})
    empty = Path(config.out_dir) / "tiny"
    empty.mkdir(parents=True)
    (empty / "metrics.jsonl").write_text('{"step": 3, "train/loss": 9.0}\n')
    run_dir = train(config, resume=True, progress=False)
    assert run_dir == empty and load_run(run_dir, "last").info["step"] == 4
    assert not (Path(config.out_dir) / "tiny-2").exists()
    assert 9.0 not in [r.get("train/loss") for r in read_metrics(run_dir)]


def test_corpus_too_short_for_one_batch(make_config, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("ab\n" * 20, encoding="utf-8")  # 18 training lines: 54 tokens < 8 x (8 + 1)
    config = make_config({"data": {"train": str(short), "batch_size": 8, "seq_len": 8}})
    with pytest.raises(DataError, match=r"the train split has 54 tokens, fewer than one batch needs .* = 72"):
        train(config, progress=False)
    assert not (tmp_path / "runs").exists()  # nothing is written before the data is known to be usable


def test_learning_rate_schedules():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4, schedule="cosine")
    assert [lr_at(s, cfg, 104) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg, 104) == pytest.approx(1.0)
    assert lr_at(54, cfg, 104) == pytest.approx(0.55)  # half way: the mean of lr and min_lr
    assert lr_at(104, cfg, 104) == pytest.approx(0.1)
    linear = cfg.model_copy(update={"schedule": "linear"})
    assert lr_at(54, linear, 104) == pytest.approx(0.55) and lr_at(29, linear, 104) == pytest.approx(0.775)
    constant = cfg.model_copy(update={"schedule": "constant", "warmup_steps": 0})
    assert {lr_at(s, constant, 50) for s in range(50)} == {1.0}


def test_epochs_resolve_to_steps():
    assert TrainConfig(epochs=2.5).resolved_max_steps(10) == 25
    assert TrainConfig(epochs=1, grad_accum=4).resolved_max_steps(10) == 2  # round(2.5) == 2
    assert TrainConfig(max_steps=7, epochs=3).resolved_max_steps(10) == 7
    assert TrainConfig().resolved_max_steps(10) == 2000
