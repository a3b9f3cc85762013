"""TensorBoard events and metrics.jsonl: the same numbers under stable tags, one history after resume."""

from __future__ import annotations

import json
import math
import time

import pytest
from conftest import load_run, read_history, read_metrics
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lmzoo.run.layout import METRICS_FILE
from lmzoo.training.optim import lr_at
from lmzoo.training.tracking import Tracker, tensorboard_tag

TAGS = {"train/loss", "val/loss", "val/ppl", "train/lr", "train/grad_norm", "perf/tokens_per_sec"}


def scalars(run_dir) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def test_training_writes_the_stable_tags(trained_run):
    events = scalars(trained_run)
    assert {tensorboard_tag(key) for key in TAGS} <= set(events.Tags()["scalars"])
    records = read_metrics(trained_run)

    def from_jsonl(tag):
        return [(r["step"], r[tag]) for r in records if tag in r]

    for tag in TAGS | {"train/epoch"}:
        tb = [(e.step, e.value) for e in events.Scalars(tensorboard_tag(tag))]
        js = from_jsonl(tag)
        assert [s for s, _ in tb] == [s for s, _ in js], tag
        assert [v for _, v in tb] == pytest.approx([v for _, v in js], rel=1e-6), tag  # TB stores float32

    assert [s for s, _ in from_jsonl("train/loss")] == list(range(1, 31))  # log_every: 1
    assert [s for s, _ in from_jsonl("val/loss")] == [10, 20, 30]  # eval_every: 10
    for (_, loss), (_, ppl) in zip(from_jsonl("val/loss"), from_jsonl("val/ppl"), strict=True):
        assert ppl == pytest.approx(math.exp(loss))
    assert all(v > 0 for _, v in from_jsonl("perf/tokens_per_sec"))
    assert all(v > 0 for _, v in from_jsonl("train/grad_norm"))
    # The lr logged at step s is the one step s used: warmup 2 steps to 1e-2, then cosine towards min_lr.
    config = load_run(trained_run).config
    lrs = [v for _, v in from_jsonl("train/lr")]
    assert lrs == pytest.approx([lr_at(step - 1, config.train, 30) for step in range(1, 31)])
    assert lrs[:2] == pytest.approx([5e-3, 1e-2]) and lrs[-1] < 2e-4
    # Each evaluation also logs a text sample.
    assert "sample/text_summary" in events.Tags()["tensors"]


def test_metrics_jsonl_one_object_per_logged_step(tmp_path):
    tracker = Tracker(tmp_path, tmp_path / METRICS_FILE)
    before = time.time()
    tracker.log(1, {"train/loss": 2.5, "train/lr": 0.1})
    tracker.log(2, {"val/loss": float("inf")})
    tracker.close()
    lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert all(before <= record.pop("time") <= time.time() for record in lines)  # wall clock of each record
    assert lines == [
        {"step": 1, "train/loss": 2.5, "train/lr": 0.1},
        {"step": 2, "val/loss": "inf"},  # non-finite values stay valid JSON
    ]


def test_read_metrics_skips_a_torn_line(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "a": 1}\n{"step": 2, "a"\n')
    assert read_metrics(tmp_path) == [{"step": 1, "a": 1}]
    assert read_metrics(tmp_path / "nowhere") == []


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    first = Tracker(tmp_path, tmp_path / METRICS_FILE)
    for step in range(1, 6):
        first.log(step, {"train/loss": float(step)})
    first.close()

    resumed = Tracker(tmp_path, tmp_path / METRICS_FILE, resume_step=3)  # the checkpoint was at step 3
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    for step in (4, 5):
        resumed.log(step, {"train/loss": 10.0 * step})
    resumed.close()

    assert [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path)] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
        (5, 50.0),
    ]
    tb = [(e.step, e.value) for e in scalars(tmp_path).Scalars("loss/train")]
    assert tb == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]


def test_tags_are_grouped_and_the_run_facts_are_text_not_charts(trained_run):
    """Every chart is loss/, train/, val/ or perf/, and the config and parameter counts are written once
    as text, not as one-point scalar charts."""
    import yaml

    events = scalars(trained_run)
    groups = {tag.split("/")[0] for tag in events.Tags()["scalars"]}
    assert groups == {"loss", "train", "val", "perf"}
    config_text = events.Tensors("run/config/text_summary")
    assert len(config_text) == 1 and config_text[0].step == 0
    logged = yaml.safe_load(config_text[0].tensor_proto.string_val[0].decode())
    assert logged == yaml.safe_load((trained_run / "config.yaml").read_text())
    markers = [r for r in read_metrics(trained_run) if "event" in r]
    model = load_run(trained_run).model
    assert [(m["event"], m["step"]) for m in markers] == [("start", 0)]
    assert markers[0]["params/total"] == sum(p.numel() for p in model.parameters())
    assert markers[0]["device"] == "cpu" and markers[0]["torch"]


def test_tensorboard_opens_on_the_loss_curves(trained_run):
    """TensorBoard sorts its groups by name: the first holds the train and val loss (and nothing else),
    and the custom-scalars layout draws both on one chart. metrics.jsonl keeps its keys."""
    import re

    from tensorboard.plugins.custom_scalar import layout_pb2

    events = scalars(trained_run)
    tags = sorted(events.Tags()["scalars"])
    first = tags[0].split("/")[0]
    assert first == "loss" and {t for t in tags if t.startswith(first + "/")} == {"loss/train", "loss/val"}
    assert [e.value for e in events.Scalars("loss/val")] == pytest.approx(
        [r["val/loss"] for r in read_metrics(trained_run) if "val/loss" in r], rel=1e-6
    )
    (config,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    charts = [chart for category in layout.category for chart in category.chart]
    on_one = [
        chart
        for chart in charts
        if all(any(re.search(p, tag) for p in chart.multiline.tag) for tag in ("loss/train", "loss/val"))
    ]
    assert layout.category[0].title == "loss" and on_one
    assert all(
        not re.search(p, t) for p in on_one[0].multiline.tag for t in tags if not t.startswith("loss/")
    )


def test_history_stitches_segments_on_one_training_clock(tmp_path):
    """Elapsed training time runs on across a resume without the gap; a start that logged nothing before
    a restart at the same step is superseded."""
    records = [
        {"step": 0, "event": "start", "time": 50.0, "device": "cpu"},  # failed before its first step
        {"step": 0, "event": "start", "time": 100.0, "device": "cpu"},
        {"step": 1, "train/loss": 3.0, "time": 110.0},
        {"step": 2, "train/loss": 2.0, "time": 120.0},
        {"step": 2, "event": "resume", "time": 1000.0, "device": "cuda:0"},  # 880 s later
        {"step": 3, "train/loss": "nan", "time": 1005.0},
    ]
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    history = read_history(tmp_path)
    steps, values, elapsed = history.series("train/loss")
    assert steps == [1, 2, 3] and values[:2] == [3.0, 2.0] and math.isnan(values[2])
    assert elapsed == [10.0, 20.0, 25.0] and history.wall_seconds == 25.0
    assert [(s.event, s.first_step, s.last_step, s.seconds) for s in history.segments] == [
        ("start", 0, 2, 20.0),
        ("resume", 2, 3, 5.0),
    ]
    assert history.resume_steps == [2] and history.facts["device"] == "cuda:0"
