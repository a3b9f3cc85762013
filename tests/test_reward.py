"""Reward models: the Bradley-Terry loss by hand, the scalar head read at the last token for every family,
a tiny reward model that learns a preference (LSTM and Transformer), and bad preference files refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import base_config_dict, config_from_dict, tiny_model_section
from typer.testing import CliRunner

from lmzoo.cli import app
from lmzoo.data.batch import RewardPairBatch
from lmzoo.models import build_model
from lmzoo.models.reward import RewardModel
from lmzoo.run import Run
from lmzoo.training.loop import train
from lmzoo.training.objectives import RewardObjective


def test_the_reward_loss_is_the_bradley_terry_formula():
    scores = {1: 2.0, 2: -1.0, 3: 0.5, 4: 1.5}  # reward of each sequence, by its first token

    def forward(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return torch.tensor([scores[int(row[0])] for row in ids])

    batch = RewardPairBatch(
        torch.tensor([[1, 5], [3, 5]]),
        torch.tensor([2, 2]),
        torch.tensor([[2, 5], [4, 0]]),
        torch.tensor([2, 1]),
    )
    objective = RewardObjective()
    loss, tokens = objective(forward, batch)
    # -log sigmoid(c - r) = log(1 + exp(-(c - r))): pairs (2, -1) and (0.5, 1.5)
    expected = (math.log(1 + math.exp(-3.0)) + math.log(1 + math.exp(1.0))) / 2
    assert float(loss) == pytest.approx(expected) and tokens == 7
    assert objective.metrics["reward_accuracy"] == 0.5 and objective.metrics[
        "reward_margin"
    ] == pytest.approx(1.0)


def test_pair_accuracy_is_reported_per_kind_and_per_task_and_kind():
    from lmzoo.inference.preferences import pair_metrics

    chosen = torch.tensor([1.0, 1.0, 0.0, 2.0, 0.0])
    rejected = torch.tensor([0.0, 2.0, 0.0, 1.0, 1.0])  # right, wrong, tie (half), right, wrong
    kinds = ["style", "correct", "correct", "correct", "style"]
    tasks = ["add", "add", "add", "copy", "copy"]
    got = pair_metrics(chosen, rejected, kinds, tasks)
    assert got["reward_accuracy"] == pytest.approx(2.5 / 5)
    assert got["reward_accuracy/correct"] == pytest.approx(1.5 / 3) and got["reward_accuracy/style"] == 0.5
    assert got["reward_accuracy/add/correct"] == pytest.approx(0.25)  # one wrong, one tie
    assert got["reward_accuracy/add/style"] == 1.0 and got["reward_accuracy/copy/style"] == 0.0
    assert got["reward_accuracy/copy/correct"] == 1.0
    assert not any(k.count("/") == 2 for k in pair_metrics(chosen, rejected, kinds))  # no tasks: per kind


@pytest.mark.parametrize("family", ["lstm", "gpt", "modern"])
def test_a_reward_model_reads_the_last_token_and_ignores_the_padding_after_it(family):
    torch.manual_seed(0)
    model = RewardModel(build_model(tiny_model_section(family), 30)).eval()
    with torch.no_grad():
        model.score.proj.weight.normal_()
        ids = torch.tensor([[5, 6, 7, 3, 0, 0], [5, 9, 8, 7, 6, 3]])
        scores = model(ids, torch.tensor([4, 6]))
        h, _ = model.lm.hidden(ids)
        by_hand = model.score.proj(h).squeeze(-1)
        torch.testing.assert_close(scores, torch.stack([by_hand[0, 3], by_hand[1, 5]]))
        alone = model(torch.tensor([[5, 6, 7, 3]]), torch.tensor([4]))
        torch.testing.assert_close(scores[0], alone[0], rtol=1e-5, atol=1e-6)


PROMPTS = [
    "Say it.\ncat\n",
    "Say it.\ndog\n",
    "Say it.\nbat\n",
    "Say it.\ncow\n",
    "Say it.\nemu\n",
    "Say it.\nyak\n",
]


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def pairs_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sft_base(tmp_path_factory) -> Path:
    """A tiny trained LSTM run whose tokenizer knows the pairs' characters (read-only)."""
    root = tmp_path_factory.mktemp("reward_base")
    corpus = root / "text.txt"
    corpus.write_text("".join(p + w + ".\n" for p in PROMPTS for w in ("cat", "dog", "bat")) * 3)
    raw = base_config_dict(root / "runs", corpus, name="base")
    raw["train"].update(max_steps=4, eval_every=4)
    return train(config_from_dict(raw), progress=False)


def reward_dict(base: Path | None, root: Path, family: str = "lstm") -> dict:
    # the style preference: the same answer with a final full stop over without
    rows = [
        {"kind": "style", "prompt": p, "chosen": p.split("\n")[1] + ".", "rejected": p.split("\n")[1]}
        for p in PROMPTS
    ]
    train_file = pairs_file(root / "pairs.jsonl", rows * 4)
    raw = {
        "name": f"rm_{family}",
        "out_dir": str(root / "runs"),
        "seed": 5,
        "data": {"format": "preference", "train": str(train_file), "val": str(train_file), "batch_size": 6},
        "train": {"objective": "reward", "max_steps": 30, "eval_every": 15, "warmup_steps": 0, "lr": 2e-2,
                  "schedule": "constant", "device": "cpu", "precision": "fp32", "log_every": 5},
    }  # fmt: skip
    if base is not None:
        raw["init_from"] = str(base)
    else:
        raw["tokenizer"] = {"kind": "char"}
        raw["model"] = tiny_model_section(family)
    return raw


@pytest.mark.parametrize("family", ["lstm", "gpt"])
def test_a_tiny_reward_model_learns_a_preference_on_an_lstm_as_on_a_transformer(sft_base, tmp_path, family):
    raw = reward_dict(sft_base if family == "lstm" else None, tmp_path, family)
    run_dir = train(config_from_dict(raw), progress=False)
    run = Run.open(run_dir)
    info = run.info("best")
    assert info["val_reward_accuracy"] >= 0.95 and info["val_reward_accuracy/style"] >= 0.95
    evaluations = [r for r in json_lines(run_dir / "metrics.jsonl") if "val/loss" in r]
    if family == "lstm":  # a fine-tune evaluates at step 0: the head starts at zero, every pair ties
        assert evaluations[0]["step"] == 0 and evaluations[0]["val/reward_accuracy"] == 0.5
        assert evaluations[0]["val/loss"] == pytest.approx(math.log(2))
    model = run.reward_model(device="cpu")
    tokenizer = run.tokenizer
    with torch.no_grad():
        good, bad = (
            model(
                torch.tensor([tokenizer.encode(PROMPTS[0] + answer) + [tokenizer.eos_id]]), torch.tensor([n])
            )
            for answer, n in (("cat.", len(PROMPTS[0]) + 5), ("cat", len(PROMPTS[0]) + 4))
        )
    assert float(good) > float(bad)
    result = CliRunner().invoke(
        app, ["generate", "--run", str(run_dir), "--seed", "x", "--max-new-tokens", "3"]
    )
    assert result.exit_code == 2 and "is a reward model" in result.stderr
    # lmzoo eval --pairs scores the validation file as the run's own evaluation did
    pairs = CliRunner().invoke(app, ["eval", "--run", str(run_dir), "--pairs", raw["data"]["val"], "--json"])
    assert pairs.exit_code == 0, pairs.output
    report = json.loads(pairs.stdout)
    assert report["reward_accuracy"] == info["val_reward_accuracy"] and report["pairs"] == 24
    assert report["loss"] == pytest.approx(info["val_loss"], rel=1e-5)


def test_bad_preference_files_are_refused_in_one_line(tmp_path):
    good = {"prompt": PROMPTS[0], "chosen": "cat.", "rejected": "cat"}
    cases = {
        "missing": ([good, {"prompt": PROMPTS[0], "chosen": "cat."}], "line 2: field 'rejected' is missing"),
        "empty": ([good, {**good, "chosen": "  "}], "line 2: field 'chosen' is empty"),
        "long": ([good, {**good, "prompt": "Say it.\n" * 5}], "record 2: prompt, response and <eos> are 45 tokens"),
    }  # fmt: skip
    runner = CliRunner()
    for name, (rows, message) in cases.items():
        raw = reward_dict(None, tmp_path, "gpt")  # context 32
        raw["data"]["train"] = raw["data"]["val"] = str(pairs_file(tmp_path / f"{name}.jsonl", rows * 2))
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(raw))
        result = runner.invoke(app, ["train", str(config)])
        assert result.exit_code == 2, (name, result.output)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, (
            name,
            result.stderr,
        )
