"""RL: the formulas by hand (GAE, PPO's clipped losses and KL-penalised reward, GRPO's advantages, the KL
controller), tiny PPO and GRPO runs that raise a programmatic reward, exact resume mid-rollout, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import base_config_dict, config_from_dict, deep_merge, read_metrics, tiny_model_section
from typer.testing import CliRunner

from lmzoo.cli import app
from lmzoo.errors import ConfigError, DataError
from lmzoo.inference.complete import Completion
from lmzoo.run import Run
from lmzoo.training.loop import train
from lmzoo.training.rl import rewards
from lmzoo.training.rl.advantages import gae, group_advantages, whiten
from lmzoo.training.rl.losses import (
    KLController,
    clipped_policy_loss,
    clipped_value_loss,
    k3_kl,
    kl_penalised_rewards,
)

# ---- the formulas, by hand ------------------------------------------------------------------------


def test_gae_equals_a_hand_computation():
    # one row: a prompt position (off the mask), three actions, one pad
    rewards = torch.tensor([[0.0, 0.5, -1.0, 2.0, 0.0]])
    values = torch.tensor([[9.0, 1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[False, True, True, True, False]])
    gamma, lam = 0.9, 0.8
    d3 = 2.0 + gamma * 0.0 - 3.0  # the last action: nothing after it
    d2 = -1.0 + gamma * 3.0 - 2.0
    d1 = 0.5 + gamma * 2.0 - 1.0
    a3 = d3
    a2 = d2 + gamma * lam * a3
    a1 = d1 + gamma * lam * a2
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, torch.tensor([[0.0, a1, a2, a3, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.0, a1 + 1.0, a2 + 2.0, a3 + 3.0, 0.0]]))


def test_ppo_clipped_objective_and_value_loss_match_their_formulas():
    logprobs = torch.tensor([[math.log(0.5), math.log(0.9), math.log(0.2)]])
    old = torch.tensor([[math.log(0.4), math.log(0.5), math.log(0.4)]])
    advantages = torch.tensor([[1.0, 2.0, -1.0]])
    mask = torch.tensor([[True, True, True]])
    # ratios 1.25, 1.8, 0.5; clip 0.2:
    #   A=1, r=1.25: max(-1.25, -1.2) = -1.2 (clipped)   A=2, r=1.8: max(-3.6, -2.4) = -2.4 (clipped)
    #   A=-1, r=0.5: max(0.5, 0.8) = 0.8 (clipped)
    loss = clipped_policy_loss(logprobs, old, advantages, mask, clip=0.2)
    assert float(loss.loss) == pytest.approx((-1.2 - 2.4 + 0.8) / 3)
    assert float(loss.clip_fraction) == pytest.approx(1.0)
    log_ratios = [math.log(1.25), math.log(1.8), math.log(0.5)]
    assert float(loss.approx_kl) == pytest.approx(sum(0.5 * x * x for x in log_ratios) / 3)
    # inside the clip range the plain surrogate -A * ratio
    inside = clipped_policy_loss(old + 0.1, old, advantages, mask, clip=0.2)
    assert float(inside.loss) == pytest.approx(-math.exp(0.1) * (1 + 2 - 1) / 3, rel=1e-6)
    assert float(inside.clip_fraction) == 0.0

    values = torch.tensor([[1.0, 0.0, 2.0]])
    old_values = torch.tensor([[0.5, 0.5, 2.1]])
    returns = torch.tensor([[2.0, -1.0, 2.0]])
    # clipped values (c 0.2): 0.7, 0.3, 2.0 -> errors max((1-2)^2, (0.7-2)^2) = 1.69,
    # max((0+1)^2, (0.3+1)^2) = 1.69, max(0, 0) = 0
    value = clipped_value_loss(values, old_values, returns, mask, clip=0.2)
    assert float(value) == pytest.approx(0.5 * (1.69 + 1.69 + 0.0) / 3)


def test_kl_penalty_and_k3_estimator_match_their_formulas():
    logprobs = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, -0.5, 0.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, 0.0], [0.0, -0.25, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True, False], [False, True, False, False]])
    scores = torch.tensor([3.0, -1.0])
    rewards = kl_penalised_rewards(scores, logprobs, ref, mask, beta=0.1)
    expected = torch.tensor([[0.0, -0.1 * 0.5, -0.1 * -1.0 + 3.0, 0.0], [0.0, -0.1 * -0.25 - 1.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)
    k3 = k3_kl(torch.tensor([-1.0]), torch.tensor([-1.5]))
    assert float(k3) == pytest.approx(math.exp(-0.5) + 0.5 - 1.0)
    assert float(k3_kl(torch.tensor([-0.3]), torch.tensor([-0.3]))) == 0.0


def test_the_adaptive_kl_controller_moves_beta_by_hand():
    controller = KLController(0.1, target=2.0, horizon=100)
    controller.update(kl=3.0, responses=10)  # error clip(3/2 - 1, -0.2, 0.2) = 0.2
    assert controller.beta == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    controller.update(kl=1.8, responses=10)  # error -0.1
    assert controller.beta == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 0.1))
    fixed = KLController(0.1)
    fixed.update(kl=50.0, responses=10)
    assert fixed.beta == 0.1


def test_grpo_group_advantages_by_hand():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    advantages = group_advantages(scores, group_size=4, eps=1e-4)
    # group 1: mean 0.5, population std 0.5 -> +-1/(0.5 + 1e-4); group 2: all equal -> 0
    a = 0.5 / (0.5 + 1e-4)
    torch.testing.assert_close(advantages, torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]))
    white = whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[True, True, True, False]]))
    torch.testing.assert_close(
        white, torch.tensor([[-math.sqrt(1.5), 0.0, math.sqrt(1.5), 0.0]]), rtol=1e-4, atol=1e-4
    )


def test_an_empty_response_is_its_eos_and_the_reward_model_scores_it():
    from lmzoo.models import build_model
    from lmzoo.models.reward import RewardModel

    torch.manual_seed(0)
    model = RewardModel(build_model(tiny_model_section("gpt"), 20)).eval()
    with torch.no_grad():
        model.score.proj.weight.normal_()
        model.likelihood_weight.fill_(0.5)  # the empty response's likelihood is that of its <eos>
    scorer = rewards.ModelReward(model, eos_id=3)
    empty = Completion([5, 6], [], True, "")
    scores = scorer([empty, Completion([5, 6], [7], True, "x")], [{}, {}])
    with torch.no_grad():
        alone = model(torch.tensor([[5, 6, 3]]), torch.tensor([3]), torch.tensor([2]))
    assert scores.shape == (2,) and float(scores[0]) == pytest.approx(float(alone[0]), rel=1e-5, abs=1e-5)


# ---- tiny runs --------------------------------------------------------------------------------------

PROMPTS = [
    {"task": "toy", "instruction": "Say a.", "input": w, "output": "a"}
    for w in ("cat", "dog", "bat", "cow", "ant", "emu", "eel", "yak")
]
TEXT = "".join(f"{r['instruction']}\n{r['input']}\nabcdefgh xyz\n" for r in PROMPTS) * 6


def _share_of_a(completions, records) -> torch.Tensor:
    """The toy reward: the share of the response's characters that are 'a'."""
    return torch.tensor([c.text.count("a") / max(1, len(c.text)) for c in completions])


@pytest.fixture(autouse=True)
def toy_reward():
    rewards.register_reward("share_of_a", _share_of_a)
    yield
    rewards.REWARDS.pop("share_of_a", None)


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory) -> Path:
    """A tiny gpt run (context 32) that has read the toy prompts: the policy RL starts from (read-only)."""
    root = tmp_path_factory.mktemp("rl_base")
    corpus = root / "text.txt"
    corpus.write_text(TEXT)
    raw = base_config_dict(root / "runs", corpus, name="base")
    raw["model"] = tiny_model_section("gpt", context_length=32)
    raw["train"].update(max_steps=10, eval_every=10)
    return train(config_from_dict(raw), progress=False)


def rl_dict(base: Path, root: Path, objective: str, extra: dict | None = None) -> dict:
    prompts = root / "prompts.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    raw = {
        "name": objective,
        "out_dir": str(root / "runs"),
        "seed": 3,
        "init_from": str(base),
        "data": {"format": "instruct", "train": str(prompts), "val": str(prompts), "batch_size": 8,
                 "template": "{instruction}\n{input}\n"},
        "rl": {"reward": "share_of_a", "prompts_per_rollout": 4, "samples_per_prompt": 4 if objective == "grpo" else 2,
               "epochs": 2, "max_new_tokens": 6, "eval_prompts": 4, "kl_coef": 0.01, "target_kl": 2.0},
        "train": {"objective": objective, "max_steps": 40, "eval_every": 20, "log_every": 2, "warmup_steps": 0,
                  "schedule": "constant", "lr": 3e-2, "device": "cpu", "precision": "fp32"},
    }  # fmt: skip
    return deep_merge(raw, extra or {})


@pytest.mark.parametrize("objective", ["ppo", "grpo"])
def test_a_tiny_rl_run_raises_a_programmatic_reward(toy_base, tmp_path, objective):
    run_dir = train(config_from_dict(rl_dict(toy_base, tmp_path, objective)), progress=False)
    logged = [r for r in read_metrics(run_dir) if "train/reward" in r]
    first, last = logged[0]["train/reward"], sum(r["train/reward"] for r in logged[-3:]) / 3
    assert last > first + 0.3 and last > 0.5, (first, last)
    for key in ("train/kl", "train/entropy", "train/response_tokens", "train/policy_loss"):
        assert all(math.isfinite(r[key]) for r in logged), key
    if objective == "ppo":
        assert "train/value_loss" in logged[0] and logged[-1]["train/kl_coef"] != logged[0]["train/kl_coef"]
    evaluations = [r for r in read_metrics(run_dir) if "val/reward" in r]
    assert [r["step"] for r in evaluations] == [0, 20, 40]
    assert evaluations[-1]["val/kl"] > 0 and "val/exact_match" in evaluations[-1]
    # the run's model is a plain language model: lmzoo generate and eval read it
    run = Run.open(run_dir)
    text = "".join(run.generate("Say a.\ncat\n", greedy=True, max_new_tokens=6, device="cpu"))
    assert text.count("a") >= 3


def test_lora_grpo_trains_only_its_adapters_against_the_base_as_reference(toy_base, tmp_path):
    extra = {
        "finetune": {"method": "lora", "r": 4, "alpha": 8.0},
        "train": {"max_steps": 12, "eval_every": 6},
    }
    run_dir = train(config_from_dict(rl_dict(toy_base, tmp_path, "grpo", extra)), progress=False)
    assert (run_dir / "checkpoints" / "last" / "adapter.safetensors").is_file()
    evaluations = [r for r in read_metrics(run_dir) if "val/kl" in r]
    assert evaluations[0]["val/kl"] == pytest.approx(0.0, abs=1e-6) and evaluations[-1]["val/kl"] > 0


def _final_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    run = Run.open(run_dir)
    return run.trained_model("last").state_dict(), run.train_state()


def test_resume_mid_rollout_is_exact(toy_base, tmp_path):
    """Stopped in the middle of a rollout's minibatches and resumed: the same weights, value head, KL
    coefficient, rollout generator and data position as a run that never stopped."""
    # a rollout is 8 prompts x 2 responses = 16, served as 2 epochs x 2 minibatches of 8: 4 steps
    half = rl_dict(
        toy_base, tmp_path / "b", "ppo", {"train": {"max_steps": 6}, "rl": {"prompts_per_rollout": 8}}
    )
    full = deep_merge(half, {"train": {"max_steps": 10}})
    straight = train(
        config_from_dict(deep_merge(full, {"out_dir": str(tmp_path / "a" / "runs")})), progress=False
    )
    first = train(config_from_dict(half), progress=False)
    assert Run.open(first).train_state()["data"]["position"] == 2  # stopped mid-rollout
    resumed = train(config_from_dict(full), resume=True, progress=False)
    assert resumed == first
    (a_weights, a_state), (b_weights, b_state) = _final_state(straight), _final_state(resumed)
    assert all(torch.equal(a_weights[k], b_weights[k]) for k in a_weights)
    a_value, b_value = a_state["ranks"][0]["value_head"], b_state["ranks"][0]["value_head"]
    assert all(torch.equal(v, b_value[k]) for k, v in a_value.items())
    assert a_state["data"]["kl"] == b_state["data"]["kl"] and a_state["data"]["kl"]["beta"] != 0.01
    assert torch.equal(a_state["data"]["generator"], b_state["data"]["generator"])
    assert a_state["data"]["position"] == b_state["data"]["position"]
    losses = {r["step"]: r["train/policy_loss"] for r in read_metrics(straight) if "train/policy_loss" in r}
    again = {r["step"]: r["train/policy_loss"] for r in read_metrics(resumed) if "train/policy_loss" in r}
    assert losses == again


# ---- refusals, one line each -------------------------------------------------------------------------


def test_rl_refuses_bad_input_in_one_line(toy_base, tmp_path):
    runner = CliRunner()
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"instruction": "Say a.", "input": "x" * 40, "output": "a"}) + "\n")
    cases = {
        "long": (rl_dict(toy_base, tmp_path, "grpo", {"data": {"train": str(long)}}), "context of 32"),
        "no reward run": (rl_dict(toy_base, tmp_path, "ppo", {"rl": {"reward": "model"}}), "rl.reward_run:"),
        "not a reward model": (
            rl_dict(toy_base, tmp_path, "ppo", {"rl": {"reward": "model", "reward_run": str(toy_base)}}),
            "is not a reward model",
        ),
        "unknown reward": (rl_dict(toy_base, tmp_path, "ppo", {"rl": {"reward": "nope"}}), "unknown reward 'nope'"),
        "group of one": (rl_dict(toy_base, tmp_path, "grpo", {"rl": {"samples_per_prompt": 1}}), "2 or more"),
    }  # fmt: skip
    for name, (raw, message) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.yaml"
        path.write_text(yaml.safe_dump(raw))
        result = runner.invoke(app, ["train", str(path)])
        assert result.exit_code == 2, (name, result.output)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, (
            name,
            result.stderr,
        )
    with pytest.raises(DataError, match="longer than the model's context"):
        train(config_from_dict(cases["long"][0]), progress=False)


def test_rl_on_a_seq2seq_run_is_refused_in_one_line(tmp_path):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"a{i}\tb{i}\n" for i in range(20)))
    raw = base_config_dict(tmp_path / "runs", pairs, name="s2s")
    raw["data"] = {"format": "tsv", "train": str(pairs), "batch_size": 4}
    raw["model"] = tiny_model_section("seq2seq")
    raw["train"].update(max_steps=2, eval_every=2)
    base = train(config_from_dict(raw), progress=False)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"instruction": "x", "input": "", "output": "y"}) + "\n")
    with pytest.raises(
        ConfigError, match="ppo scores a language model's responses; model 'seq2seq' is a seq2seq"
    ):
        config_from_dict({"name": "rl", "init_from": str(base), "data": {"format": "instruct", "train": str(prompts)},
                          "train": {"objective": "ppo"}, "rl": {"reward": "exact_match"}})  # fmt: skip
