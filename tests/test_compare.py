"""`lmzoo compare`: one token budget for every config, matching runs reused, bits per character, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import TINY_TEXT, base_config_dict, read_metrics
from PIL import Image
from typer.testing import CliRunner

import lmzoo.training.loop
from lmzoo.analysis.compare import bits_per_char, compare
from lmzoo.analysis.compare_files import write_outputs
from lmzoo.cli import app

TOKENS = 160


def write_config(path: Path, corpus: Path, model: dict, **data) -> Path:
    raw = base_config_dict(path.parent / "unused", corpus, name=path.stem)
    del raw["name"], raw["out_dir"]
    raw["model"] = model
    raw["data"].update(data)
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.fixture
def configs(tmp_path, corpus_file) -> list[Path]:
    """An LSTM at 4 x 8 = 32 tokens per step and a GPT at 3 x 10 = 30: different steps for one budget."""
    lstm = {"name": "lstm", "embedding_dim": 8, "hidden_size": 16, "num_layers": 1, "dropout": 0.0}
    gpt = {"name": "gpt", "d_model": 16, "n_heads": 2, "n_layers": 1, "context_length": 16}
    return [
        write_config(tmp_path / "lstm.yaml", corpus_file, lstm),
        write_config(tmp_path / "gpt.yaml", corpus_file, gpt, batch_size=3, seq_len=10),
    ]


@pytest.fixture
def counted(monkeypatch) -> list[str]:
    """The names of the runs lmzoo.training.loop.train was asked to train."""
    calls: list[str] = []
    real = lmzoo.training.loop.train

    def counting(config, **kwargs):
        calls.append(config.name)
        return real(config, **kwargs)

    monkeypatch.setattr(lmzoo.training.loop, "train", counting)
    return calls


def test_every_run_gets_the_same_token_budget_and_matching_runs_are_reused(tmp_path, configs, counted):
    out = tmp_path / "out"
    first = compare(configs, tokens=TOKENS, out=out, progress=False)
    assert counted == ["lstm-s1337", "gpt-s1337"] and first.trained == 2
    per_step = {"lstm": 32, "gpt": 30}
    for result in first.results:
        row, step_tokens = result.row, per_step[result.planned.label]
        assert abs(row["tokens"] - TOKENS) <= step_tokens / 2  # within half a batch of the budget
        trained_steps = max(r["step"] for r in read_metrics(result.run_dir) if "train/loss" in r)
        assert row["tokens"] == trained_steps * step_tokens  # what the run really read
        assert result.planned.config.train.max_steps == round(TOKENS / step_tokens)
        assert row["wall_seconds"] > 0 and row["peak_memory_mb"] > 50  # measured around the training call
        # A char tokenizer scores one token per character: bits/char = nats/token / ln 2.
        assert row["val_bpc"] == pytest.approx(row["val_loss_best"] / math.log(2))
    tokens = [r.row["tokens"] for r in first.results]
    assert max(tokens) - min(tokens) <= max(per_step.values())  # the same budget, to within one batch

    again = compare(configs, tokens=TOKENS, out=out, progress=False)
    assert counted == ["lstm-s1337", "gpt-s1337"] and again.trained == 0  # nothing retrained
    assert [r.run_dir for r in again.results] == [r.run_dir for r in first.results]
    assert [r.row for r in again.results] == [r.row for r in first.results]  # measurements kept too

    compare(configs, tokens=2 * TOKENS, out=out, progress=False)  # another budget is another config
    assert len(counted) == 4


def test_outputs_table_diff_curves_and_samples(tmp_path, configs):
    out = tmp_path / "out"
    result = compare(configs, tokens=TOKENS, seeds=2, out=out, progress=False)
    result.samples = {"lstm": "ROMEO: a|b\nc", "gpt": "ROMEO: <x>"}
    files = write_outputs(result, out)
    assert {f.name for f in files} == {"compare.md", "compare.csv", "compare.json", "compare.png"}
    with Image.open(out / "compare.png") as image:
        assert image.size == (1100, 420)  # 11 x 4.2 inches at 100 dpi
    payload = json.loads((out / "compare.json").read_text())
    bpcs = [row["val_bpc"]["mean"] for row in payload["table"]]
    assert bpcs == sorted(bpcs) and len(payload["runs"]) == 4
    for row in payload["table"]:
        values = row["val_bpc"]["values"]
        assert row["seeds"] == [1337, 1338] and len(values) == 2
        assert row["val_bpc"]["spread"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    assert payload["differs"]["model.name"] == {"lstm": "lstm", "gpt": "gpt"}
    assert payload["differs"]["data.batch_size"] == {"lstm": "4", "gpt": "3"}
    assert "train.lr" not in payload["differs"]
    markdown = (out / "compare.md").read_text()
    assert "Held equal: the validation text" in markdown and "seeds 1337, 1338" in markdown
    assert " ± " in markdown.split("## What differs")[0]
    assert "ROMEO: a&#124;b<br>c | ROMEO: &lt;x&gt;" in markdown  # side by side, escaped
    csv_lines = (out / "compare.csv").read_text().splitlines()
    assert csv_lines[0].startswith("model,family,device,seeds,params,params_std")
    assert [line.split(",")[0] for line in csv_lines[1:]] == [row["model"] for row in payload["table"]]


def test_bits_per_char_by_hand():
    # 10 tokens at 1.5 nats each over 25 characters: 15 nats = 21.64 bits over 25 characters.
    assert bits_per_char(1.5, 10, 25) == pytest.approx(15 / math.log(2) / 25)


def test_refuses_one_config_and_different_validation_text(tmp_path, configs, corpus_file, counted):
    other = tmp_path / "other.txt"
    other.write_text(TINY_TEXT.replace("bird", "frog"), encoding="utf-8")
    lstm = yaml.safe_load(configs[0].read_text())["model"]
    elsewhere = write_config(tmp_path / "elsewhere.yaml", other, lstm)
    runner = CliRunner()
    for args, message in [
        ([str(configs[0])], "at least two configs"),
        ([str(configs[0]), str(elsewhere)], "validate on different text"),
    ]:
        result = runner.invoke(app, ["compare", *args, "--tokens", "64", "--out", str(tmp_path / "o")])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert counted == [] and not (tmp_path / "o").exists()  # refused before training anything
