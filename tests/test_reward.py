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

    def forward(ids: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        assert starts.tolist() == [1, 1, 1, 1]  # each pair's prompt length, for chosen and rejected
        return torch.tensor([scores[int(row[0])] for row in ids])

    batch = RewardPairBatch(
        torch.tensor([[1, 5], [3, 5]]),
        torch.tensor([2, 2]),
        torch.tensor([[2, 5], [4, 0]]),
        torch.tensor([2, 1]),
        torch.tensor([1, 1]),
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
        model.likelihood_weight.fill_(0.7)
        ids = torch.tensor([[5, 6, 7, 3, 0, 0], [5, 9, 8, 7, 6, 3]])
        # prompts [5, 6] and [5, 9, 8]: the responses are [7, 3] and [7, 6, 3] (<eos> = 3)
        scores = model(ids, torch.tensor([4, 6]), torch.tensor([2, 3]))
        h, _ = model.lm.hidden(ids)
        head = model.score.proj(h).squeeze(-1)
        logp = model.lm(ids)[0].log_softmax(-1)  # (B, T, V)
        first = logp[0, 1, 7] + logp[0, 2, 3]  # log p(7 | 5 6) + log p(3 | 5 6 7)
        second = logp[1, 2, 7] + logp[1, 3, 6] + logp[1, 4, 3]
        by_hand = torch.stack([head[0, 3] + 0.7 * first, head[1, 5] + 0.7 * second])
        torch.testing.assert_close(scores, by_hand, rtol=1e-4, atol=1e-5)
        alone = model(torch.tensor([[5, 6, 7, 3]]), torch.tensor([4]), torch.tensor([2]))
        torch.testing.assert_close(scores[0], alone[0], rtol=1e-5, atol=1e-5)
        head_only = RewardModel(model.lm, likelihood=False)
        head_only.score.load_state_dict(model.score.state_dict())
        torch.testing.assert_close(
            head_only(ids, torch.tensor([4, 6]), torch.tensor([2, 3])),
            by_hand - 0.7 * torch.stack([first, second]),
            rtol=1e-4,
            atol=1e-5,
        )


def test_a_reward_model_saved_without_the_likelihood_weight_loads_as_the_head_alone(tmp_path):
    from safetensors.torch import save_file

    from lmzoo.run.checkpoint import load_weights

    torch.manual_seed(0)
    old = RewardModel(build_model(tiny_model_section("gpt"), 30))
    state = {k: v.clone() for k, v in old.state_dict().items() if k != "likelihood_weight"}
    state["score.proj.bias"] = torch.tensor([0.25])
    save_file(state, str(tmp_path / "model.safetensors"))
    new = RewardModel(build_model(tiny_model_section("gpt"), 30))
    new.likelihood_weight.data.fill_(3.0)
    load_weights(new, tmp_path / "model.safetensors")
    assert new.likelihood_weight.item() == 0.0 and new.score.proj.bias.item() == 0.25


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


def likelihood_loss(base: Path, pairs: str) -> float:
    """The Bradley-Terry loss of the pairs when the reward is log p(response + <eos> | prompt) under `base`."""
    lm = Run.open(base).load("best", "cpu")

    def logp(prompt: str, response: str) -> float:
        prompt_ids = lm.tokenizer.encode(prompt)
        ids = torch.tensor([prompt_ids + lm.tokenizer.encode(response) + [lm.tokenizer.eos_id]])
        with torch.no_grad():
            logprobs = lm.model(ids)[0][0, :-1].float().log_softmax(-1)
        picked = logprobs.gather(1, ids[0, 1:, None])[:, 0]
        return float(picked[len(prompt_ids) - 1 :].sum())

    margins = torch.tensor(
        [logp(r["prompt"], r["chosen"]) - logp(r["prompt"], r["rejected"]) for r in json_lines(Path(pairs))]
    )
    return float(-torch.nn.functional.logsigmoid(margins).mean())


@pytest.mark.parametrize("family", ["lstm", "gpt"])
def test_a_tiny_reward_model_learns_a_preference_on_an_lstm_as_on_a_transformer(sft_base, tmp_path, family):
    raw = reward_dict(sft_base if family == "lstm" else None, tmp_path, family)
    run_dir = train(config_from_dict(raw), progress=False)
    run = Run.open(run_dir)
    info = run.info("best")
    assert info["val_reward_accuracy"] >= 0.95 and info["val_reward_accuracy/style"] >= 0.95
    evaluations = [r for r in json_lines(run_dir / "metrics.jsonl") if "val/loss" in r]
    # a fine-tune evaluates at step 0, where it scores a response by the base model's log-likelihood
    if family == "lstm":
        assert evaluations[0]["step"] == 0
        assert evaluations[0]["val/loss"] == pytest.approx(
            likelihood_loss(sft_base, raw["data"]["val"]), rel=1e-4
        )
    model = run.reward_model(device="cpu")
    tokenizer = run.tokenizer
    with torch.no_grad():
        start = torch.tensor([len(tokenizer.encode(PROMPTS[0]))])
        good, bad = (
            model(
                torch.tensor([tokenizer.encode(PROMPTS[0] + answer) + [tokenizer.eos_id]]),
                torch.tensor([n]),
                start,
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
