"""Speed work that must not change results: the training step without per-step host syncs (and its
deferred non-finite check), token-count batches for seq2seq, the inverse-square-root schedule, the
static-KV-cache decoder (eager and compiled), the compiled training step, and `precision: auto` on CPUs.

The compiled variants that run inductor's C++ code generation take minutes on a busy 2-core machine
and are marked slow; the quick suite keeps a variant through torch.compile's `aot_eager` backend.
"""

from __future__ import annotations

import functools
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import config_from_dict, deep_merge, load_run, tiny_model_section

from lmzoo.config import TrainConfig
from lmzoo.data.streams import RandomWindows
from lmzoo.data.token_batches import TokenBatches, padded_tokens
from lmzoo.errors import ConfigError, TrainingStopped
from lmzoo.inference.decoding import generate_ids
from lmzoo.inference.sampling import SamplingOptions
from lmzoo.models import build_model, tiny_model_config
from lmzoo.run.checkpoint import load_train_state
from lmzoo.training.distributed import DistContext, ShardedBatches
from lmzoo.training.loop import train
from lmzoo.training.objectives import LMObjective, Seq2SeqObjective
from lmzoo.training.optim import NonFiniteWatch, lr_at
from lmzoo.training.setup import setup_training

BOS, EOS = 1, 2


# ---- the inverse-square-root ("noam") schedule ------------------------------------------------------


def test_noam_rises_to_lr_at_warmup_then_decays_as_one_over_sqrt_step():
    cfg = TrainConfig(lr=1e-3, schedule="noam", warmup_steps=100)
    assert lr_at(0, cfg, 1000) == pytest.approx(1e-3 / 100)  # step 1 of a linear rise
    assert lr_at(49, cfg, 1000) == pytest.approx(1e-3 * 50 / 100)
    assert lr_at(99, cfg, 1000) == pytest.approx(1e-3)  # the peak, at step = warmup
    assert lr_at(399, cfg, 1000) == pytest.approx(1e-3 * math.sqrt(100 / 400))
    assert lr_at(99_999, cfg, 1000) == pytest.approx(1e-3 * math.sqrt(100 / 100_000))  # no floor
    # the paper's form, d_model^-0.5 * min(s^-0.5, s * w^-1.5), is the same curve with lr = (d * w)^-0.5
    paper = TrainConfig(lr=(512 * 4000) ** -0.5, schedule="noam", warmup_steps=4000)
    for step in (1, 1000, 4000, 20_000):
        expected = 512**-0.5 * min(step**-0.5, step * 4000**-1.5)
        assert lr_at(step - 1, paper, 1) == pytest.approx(expected)


# ---- the training step: no host sync per step, the non-finite check deferred ------------------------


def lm_config(make_config, **train):
    return make_config({"train": {"max_steps": 20, **train}})


def test_step_results_stay_on_the_device_and_a_device_side_skip_matches_the_synced_one(make_config):
    """The fused optimiser's device-side skip (found_inf) trains bit-identically to skipping on the host."""
    losses = {}
    for on_device in (True, False):
        setup = setup_training(lm_config(make_config))
        assert setup.stepper.skips_on_device  # fused AdamW on CPU
        setup.stepper.skips_on_device = on_device
        results = [setup.stepper(1e-2) for _ in range(8)]
        assert all(isinstance(r.loss, torch.Tensor) and r.loss.dim() == 0 for r in results)
        losses[on_device] = [float(r.loss) for r in results]
    assert losses[True] == losses[False]


def poison_step(monkeypatch, bad_call: int) -> None:
    """The loss of the `bad_call`-th objective call becomes NaN."""
    original, calls = LMObjective.__call__, {"n": 0}

    def poisoned(self, forward, batch):
        loss, tokens = original(self, forward, batch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == bad_call else loss), tokens

    monkeypatch.setattr(LMObjective, "__call__", poisoned)


def count_checks(monkeypatch) -> list[int]:
    reads: list[int] = []
    original = NonFiniteWatch.new_bad_steps

    def counted(self):
        reads.append(1)
        return original(self)

    monkeypatch.setattr(NonFiniteWatch, "new_bad_steps", counted)
    return reads


def test_an_injected_nan_stops_at_its_step_with_checks_only_at_log_and_save_steps(make_config, monkeypatch):
    poison_step(monkeypatch, 7)
    reads = count_checks(monkeypatch)
    config = lm_config(make_config, log_every=5, eval_every=5)
    with pytest.raises(TrainingStopped, match="non-finite at step 7;") as info:
        train(config, progress=False)
    assert info.value.exit_code == 3
    run = load_run(Path(config.out_dir) / config.name, "last")
    assert run.info["step"] == 5  # the save at step 10 was refused: nothing from the NaN step on
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    assert len(reads) <= 4  # step 5 (log, eval, save) and step 10 (log): not one read per step


def test_nan_policy_skip_skips_the_update_on_the_device(make_config, monkeypatch, capsys):
    poison_step(monkeypatch, 7)
    run_dir = train(lm_config(make_config, log_every=5, eval_every=10, nan_policy="skip"), progress=False)
    state = load_train_state(run_dir / "checkpoints" / "last" / "state.pt", "cpu")
    steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {19}  # 20 steps, one update skipped
    assert "non-finite loss or gradient at step 7; update skipped" in capsys.readouterr().err
    assert all(torch.isfinite(p).all() for p in load_run(run_dir, "last").model.parameters())


# ---- the compiled training step ---------------------------------------------------------------------


def compiled_vs_eager(make_config, monkeypatch, backend: str | None, mode: bool | str = True, **train_extra):
    """20 steps with and without train.compile: the same losses (allclose) and checkpoint format."""
    if backend is not None:
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    gpt = {"model": tiny_model_section("gpt"), "data": {"seq_len": 16, "sampling": "random"}}
    losses, dirs = {}, {}
    for compiled in (False, mode):
        raw = deep_merge(
            gpt, {"train": {"max_steps": 20, "eval_every": 20, "compile": compiled, **train_extra}}
        )
        config = make_config(raw)
        config.name = f"compiled-{compiled}"
        seen: list[float] = []
        dirs[compiled] = train(config, progress=False, on_step=lambda s, loss, seen=seen: seen.append(loss))
        losses[compiled] = seen
    torch.testing.assert_close(losses[mode], losses[False], rtol=1e-4, atol=1e-5)
    eager, compiled = load_run(dirs[False], "last"), load_run(dirs[mode], "last")
    eager_state, compiled_state = eager.model.state_dict(), compiled.model.state_dict()
    assert list(eager_state) == list(compiled_state)  # no "_orig_mod." prefixes: the same format
    assert all(eager_state[k].shape == compiled_state[k].shape for k in eager_state)


def test_compiled_step_matches_eager_through_aot_autograd(make_config, monkeypatch):
    compiled_vs_eager(make_config, monkeypatch, "aot_eager")


@pytest.mark.slow
def test_compiled_step_matches_eager_with_inductor(make_config, monkeypatch):
    compiled_vs_eager(make_config, monkeypatch, None)


# ---- token-count batches ------------------------------------------------------------------------------


def random_pairs(count: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [
        (
            [rng.randrange(3, 20) for _ in range(rng.randint(1, 12))] + [EOS],
            [rng.randrange(3, 20) for _ in range(rng.randint(1, 12))],
        )
        for _ in range(count)
    ]


def key(batch, row: int) -> tuple:
    """A pair as it sits in a batch: its unpadded source and target."""
    source = tuple(t for t in batch.source[row].tolist() if t)
    target = tuple(t for t in batch.target_out[row].tolist() if t)[:-1]  # without <eos>
    return source, target


def test_token_batches_keep_the_budget_and_use_every_pair_once_per_epoch():
    pairs = random_pairs(300)
    batches = TokenBatches(pairs, 120, seed=3, bos_id=BOS, eos_id=EOS)
    everything = sorted((tuple(s), tuple(t)) for s, t in pairs)
    for _ in range(2):  # two epochs, each in its own order
        seen = []
        for _ in range(len(batches)):
            batch = batches.next()
            assert batch.source.numel() + batch.target_in.numel() <= 120
            assert batch.tokens == int((batch.target_out != 0).sum())
            seen += [key(batch, row) for row in range(batch.source.shape[0])]
        assert sorted(seen) == everything
    rows = [b.source.shape[0] for b in batches]
    assert max(rows) > 2 * min(rows)  # short pairs make bigger batches
    assert padded_tokens(pairs[:2]) == 2 * (
        max(len(s) for s, _ in pairs[:2]) + max(len(t) for _, t in pairs[:2]) + 1
    )


def test_token_batches_resume_from_their_state():
    pairs = random_pairs(120)
    straight = TokenBatches(pairs, 100, seed=1, bos_id=BOS, eos_id=EOS)
    resumed = TokenBatches(pairs, 100, seed=1, bos_id=BOS, eos_id=EOS)
    for _ in range(len(straight) + 3):
        straight.next()
    resumed.load_state_dict(straight.state_dict())
    for _ in range(5):
        assert torch.equal(straight.next().source, resumed.next().source)


def test_two_ranks_compute_what_one_process_computes_with_two_micro_batches():
    """Rank r takes the r-th of each step's batches: 2 ranks average the gradients of the same two
    batches that one process accumulates with grad_accum 2."""
    pairs = random_pairs(200)
    single = TokenBatches(pairs, 96, seed=5, bos_id=BOS, eos_id=EOS)
    ranks = [
        ShardedBatches(TokenBatches(pairs, 96, seed=5, bos_id=BOS, eos_id=EOS), DistContext(r, 2, r))
        for r in range(2)
    ]
    assert len(ranks[0]) == len(single) // 2
    torch.manual_seed(0)
    model = build_model(tiny_model_config("transformer", max_len=32), (20, 20))
    objective = Seq2SeqObjective()

    def gradients(batches) -> list[torch.Tensor]:
        model.zero_grad()
        for batch in batches:
            loss, _ = objective(model, batch)
            (loss / len(batches)).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for _ in range(len(single) // 2 + 2):  # across an epoch boundary
        mine = [single.next(), single.next()]
        theirs = [rank.next() for rank in ranks]
        for a, b in zip(mine, theirs, strict=True):
            assert torch.equal(a.source, b.source) and torch.equal(a.target_out, b.target_out)
    one = gradients(mine)
    two = [(a + b) / 2 for a, b in zip(*[gradients([b]) for b in theirs], strict=True)]  # DDP's mean
    for g1, g2 in zip(one, two, strict=True):
        torch.testing.assert_close(g1, g2)
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def pair_config(tmp_path: Path, **data) -> dict:
    rng = random.Random(0)
    words = ["a", "b", "c", "d", "e", "f"]
    sources = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(120)]
    (tmp_path / "pairs.src").write_text("".join(s + "\n" for s in sources), encoding="utf-8")
    (tmp_path / "pairs.tgt").write_text("".join(s[::-1] + "\n" for s in sources), encoding="utf-8")
    return {
        "name": "tokens",
        "out_dir": str(tmp_path / "runs"),
        "data": {"format": "parallel", "train": str(tmp_path / "pairs"), "max_len": 16, **data},
        "tokenizer": {"kind": "char"},
        "model": tiny_model_section("transformer"),
        "train": {
            "max_steps": 6,
            "eval_every": 6,
            "eval_batches": 1,
            "bleu_sentences": 2,
            "warmup_steps": 2,
            "schedule": "noam",
            "device": "cpu",
            "precision": "fp32",
        },
        "sample": {"max_new_tokens": 5},
    }


def test_a_seq2seq_run_trains_on_token_batches(tmp_path):
    config = config_from_dict(pair_config(tmp_path, max_tokens=64))
    setup = setup_training(config)
    assert isinstance(setup.task.batches, TokenBatches)
    losses = []
    train(config, progress=False, on_step=lambda s, loss: losses.append(loss))
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"max_tokens": 20}, "less than the longest pair"),
        ({"max_tokens": 64, "format": "text"}, "sentence pairs"),
    ],
)
def test_max_tokens_config_errors(tmp_path, data, message):
    raw = pair_config(tmp_path, **data)
    if data.get("format") == "text":
        raw["data"]["train"] = str(tmp_path / "pairs.src")
        raw["model"] = tiny_model_section("gpt")
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


# ---- decoding with a static KV cache -------------------------------------------------------------------


def lively_gpt() -> torch.nn.Module:
    """A tiny GPT whose greedy text does not settle on one token (an untied output layer)."""
    torch.manual_seed(0)
    return build_model(tiny_model_config("gpt", context_length=16, tie_weights=False), 30).eval()


def decode(model: torch.nn.Module, prompt: list[int], cache: str) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the raw scores of every step (50 new tokens: past the 16-token context)."""
    scores: list[torch.Tensor] = []
    options = SamplingOptions(max_new_tokens=50, greedy=True)
    observe = lambda logits, token: scores.append(logits)  # noqa: E731
    return list(generate_ids(model, prompt, options, cache=cache, observe=observe)), torch.stack(scores)


@pytest.mark.parametrize("prompt_len", [1, 5, 16, 20])
def test_static_cache_decoding_equals_the_dynamic_path_past_the_context(prompt_len):
    model = lively_gpt()
    prompt = list(range(3, 3 + prompt_len))
    dynamic, dynamic_scores = decode(model, prompt, "dynamic")
    static, static_scores = decode(model, prompt, "static")
    assert static == dynamic and len(set(dynamic)) > 3
    torch.testing.assert_close(static_scores, dynamic_scores, rtol=0, atol=1e-5)


def test_a_family_without_a_static_state_refuses_the_static_cache():
    torch.manual_seed(0)
    model = build_model(tiny_model_config("lstm"), 30).eval()
    options = SamplingOptions(max_new_tokens=10, greedy=True)
    with pytest.raises(ConfigError, match="needs a Transformer decoder"):
        list(generate_ids(model, [3], options, cache="static"))
    with pytest.raises(ConfigError, match="cache must be"):
        list(generate_ids(model, [3], options, cache="fast"))


@pytest.mark.slow
def test_compiled_static_decoding_equals_the_dynamic_path():
    model = lively_gpt()
    for prompt in ([3], list(range(3, 23))):
        compiled, compiled_scores = decode(model, prompt, "compiled")
        dynamic, dynamic_scores = decode(model, prompt, "dynamic")
        assert compiled == dynamic
        torch.testing.assert_close(compiled_scores, dynamic_scores, rtol=0, atol=1e-4)


# ---- precision: auto on CPUs ----------------------------------------------------------------------------


def test_auto_precision_on_cpu_follows_the_bf16_probe(monkeypatch):
    from lmzoo import device

    device.cpu_bf16_is_faster.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # an AVX2-only CPU
    assert device.pick_precision(torch.device("cpu"), "auto") == "fp32"
    device.cpu_bf16_is_faster.cache_clear()
    monkeypatch.setattr(device, "cpu_bf16_is_faster", lambda: True)  # AVX512-BF16 / AMX
    assert device.pick_precision(torch.device("cpu"), "auto") == "bf16"
    assert device.pick_precision(torch.device("cpu"), "fp32") == "fp32"


# ---- on a GPU (pytest -m cuda; scripts/gpu_check.sh runs these) ------------------------------------------

on_cuda = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=on_cuda)])
def test_windows_gathered_on_the_device_equal_the_cpu_ones(device):
    stream = torch.arange(5000) % 97
    here, there = RandomWindows(stream, 4, 16, seed=1), RandomWindows(stream, 4, 16, seed=1, device=device)
    for _ in range(3):
        a, b = here.next(), there.next()
        assert b.inputs.device.type == device and torch.equal(a.inputs, b.inputs.cpu())


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=on_cuda)])
def test_cuda_graph_decoding_equals_the_dynamic_path(device):
    model = lively_gpt().to(device)
    for prompt in ([3], list(range(3, 23))):
        graphed, graphed_scores = decode(model, prompt, "compiled")
        dynamic, dynamic_scores = decode(model, prompt, "dynamic")
        assert graphed == dynamic
        torch.testing.assert_close(graphed_scores, dynamic_scores, rtol=0, atol=1e-3)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=on_cuda)])
def test_the_step_with_cuda_graphs_matches_eager_on_the_gpu(make_config, monkeypatch, device):
    compiled_vs_eager(make_config, monkeypatch, None, "reduce-overhead", device=device, precision="fp32")
