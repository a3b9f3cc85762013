"""The optimisation step: gradient accumulation, DDP/FSDP gradient sync, the optimisers, weight decay on
matrices only, and gradient clipping, each against a hand computation (lmzoo.training.optim)."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model_section

from lmzoo.config import TrainConfig
from lmzoo.data.batch import LMBatch
from lmzoo.models import build_model
from lmzoo.training.objectives import LMObjective
from lmzoo.training.optim import TrainStep, make_optimizer
from lmzoo.training.setup import setup_training

CPU = torch.device("cpu")
VOCAB = 17


# ---- gradient accumulation, DDP and FSDP gradient sync ------------------------------------------------


class FixedBatches:
    """A batch source that plays a given list of batches in a loop."""

    def __init__(self, batches: list) -> None:
        self.batches, self.position = batches, 0

    def next(self):
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]

    def __len__(self) -> int:
        return len(self.batches)


def tiny_gpt(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_model_section("gpt"), VOCAB)


def stepper_for(model, batches: list, forward=None, **train) -> TrainStep:
    cfg = TrainConfig(**{"optimizer": "sgd", "lr": 0.5, "weight_decay": 0.0, "grad_clip": None, **train})
    optimizer = make_optimizer(model, cfg, CPU)
    return TrainStep(
        model, optimizer, FixedBatches(batches), LMObjective(carry=False), cfg, CPU, "fp32", forward
    )


def test_grad_accum_equals_one_large_batch():
    base = tiny_gpt()
    ids = torch.randint(4, VOCAB, (8, 10), generator=torch.Generator().manual_seed(1))
    halves = [LMBatch(ids[:4, :-1], ids[:4, 1:]), LMBatch(ids[4:, :-1], ids[4:, 1:])]
    accumulated, large = copy.deepcopy(base), copy.deepcopy(base)
    two = stepper_for(accumulated, halves, grad_accum=2)(0.5)
    one = stepper_for(large, [LMBatch(ids[:, :-1], ids[:, 1:])])(0.5)
    assert two.tokens == one.tokens == 72 and float(two.loss) == pytest.approx(float(one.loss), abs=1e-6)
    assert float(two.grad_norm) == pytest.approx(float(one.grad_norm), rel=1e-5)
    for (name, a), b in zip(accumulated.named_parameters(), large.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    assert any(
        not torch.equal(a, s) for a, s in zip(accumulated.parameters(), base.parameters(), strict=True)
    )


class FakeWrapper:
    """Stands in for a distributed wrapper of the model: records each forward."""

    def __init__(self, model, events: list) -> None:
        self.model, self.events = model, events

    def __call__(self, *args, **kwargs):
        self.events.append("forward")
        return self.model(*args, **kwargs)


class FakeDDP(FakeWrapper):
    """DistributedDataParallel: `no_sync()` skips the gradient all-reduce while it is open."""

    @contextlib.contextmanager
    def no_sync(self):
        self.events.append("no_sync on")
        yield
        self.events.append("no_sync off")


class FakeFSDP(FakeWrapper):
    """An FSDP2 (fully_shard) module: gradient sync is a flag."""

    def set_requires_gradient_sync(self, flag: bool) -> None:
        self.events.append(f"sync {flag}")


@pytest.mark.parametrize("wrapper", [FakeDDP, FakeFSDP])
def test_gradient_sync_is_skipped_on_all_but_the_last_micro_batch(wrapper):
    model, events = tiny_gpt(), []
    model.token_embedding.weight.register_hook(lambda grad: events.append("backward"))
    ids = torch.randint(4, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    stepper = stepper_for(
        model, [LMBatch(ids[:, :-1], ids[:, 1:])], forward=wrapper(model, events), grad_accum=3
    )
    stepper(0.1)
    off, on = ("no_sync on", "no_sync off") if wrapper is FakeDDP else ("sync False", "sync True")
    micro = [off, "forward", "backward", on]
    assert events == micro + micro + ["forward", "backward"]  # the last backward all-reduces


# ---- optimisers, weight decay, gradient clipping ------------------------------------------------------


def small_module():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))


def with_gradients(model, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    grads = {}
    for name, param in model.named_parameters():
        grads[name] = torch.randn(param.shape, generator=generator)
        param.grad = grads[name].clone()
    return grads


def test_sgd_with_momentum_and_weight_decay_on_matrices():
    model, wd, lr, momentum = small_module(), 0.5, 0.1, 0.9
    optimizer = make_optimizer(
        model, TrainConfig(optimizer="sgd", lr=lr, momentum=momentum, weight_decay=wd), CPU
    )
    assert isinstance(optimizer, torch.optim.SGD)
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    g1 = with_gradients(model, 1)
    optimizer.step()
    p1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    g2 = with_gradients(model, 2)
    optimizer.step()
    for name, param in model.named_parameters():
        decay = wd if param.dim() >= 2 else 0.0
        buffer = g1[name] + decay * p0[name]
        assert torch.allclose(p1[name], p0[name] - lr * buffer, atol=1e-6), name
        buffer = momentum * buffer + g2[name] + decay * p1[name]
        assert torch.allclose(param, p1[name] - lr * buffer, atol=1e-6), name


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_couples_weight_decay_to_the_gradient_and_adamw_decouples_it(name):
    model, wd, lr, eps = small_module(), 0.5, 0.1, 1e-8
    cfg = TrainConfig(optimizer=name, lr=lr, weight_decay=wd, betas=(0.9, 0.99), eps=eps)
    optimizer = make_optimizer(model, cfg, CPU)
    assert isinstance(optimizer, {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name])
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = with_gradients(model, 3)
    optimizer.step()
    for pname, param in model.named_parameters():  # first step: m_hat = g, v_hat = g^2
        decay, g, p = (wd if param.dim() >= 2 else 0.0), grads[pname], p0[pname]
        if name == "adam":
            expected = p - lr * (g + decay * p) / ((g + decay * p).abs() + eps)
        else:
            expected = p * (1 - lr * decay) - lr * g / (g.abs() + eps)
        assert torch.allclose(param, expected, atol=1e-6), pname


def test_weight_decay_applies_to_matrices_only(make_config):
    model = setup_training(make_config({"model": {"num_layers": 2}})).model  # embedding, LSTM, output layer
    lr, wd = 0.1, 0.3
    optimizer = make_optimizer(model, TrainConfig(lr=lr, weight_decay=wd), CPU)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for param in model.parameters():
        param.grad = torch.zeros_like(param)  # no gradient: only the decay moves a weight
    optimizer.step()
    kinds = set()
    for name, param in model.named_parameters():
        kinds.add(param.dim())
        factor = 1 - lr * wd if param.dim() >= 2 else 1.0
        assert torch.allclose(param, before[name] * factor, atol=1e-7), name
    assert kinds == {1, 2}


def test_grad_clip_scales_the_gradient_down_to_the_limit():
    ids = torch.randint(4, VOCAB, (4, 9), generator=torch.Generator().manual_seed(4))
    batch = LMBatch(ids[:, :-1], ids[:, 1:])
    reference = tiny_gpt()
    loss, _ = reference(batch.inputs, targets=batch.targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    for limit in (0.05, None):
        model = tiny_gpt()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        result = stepper_for(model, [batch], grad_clip=limit, momentum=0.0)(1.0)  # SGD, lr 1: update = -grad
        applied = {n: before[n] - p.detach() for n, p in model.named_parameters()}
        scale = 1.0 if limit is None else limit / norm
        assert float(result.grad_norm) == pytest.approx(norm, rel=1e-5) and norm > 0.05
        applied_norm = math.sqrt(sum(float(a.pow(2).sum()) for a in applied.values()))
        assert applied_norm == pytest.approx(norm * scale, rel=1e-4)
        for name, delta in applied.items():
            assert torch.allclose(delta, grads[name] * scale, atol=1e-6), name


# ---- the optimisers' methods without torch.compile's wrappers -----------------------------------------


@pytest.mark.parametrize(
    ("name", "reference"),
    [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)],
)
def test_optimisers_update_bit_for_bit_like_torchs_through_a_state_dict_round_trip(name, reference):
    cfg = TrainConfig(optimizer=name, lr=0.05, weight_decay=0.1, momentum=0.9, betas=(0.9, 0.99))
    ours_model, torch_model = small_module(), small_module()
    ours = make_optimizer(ours_model, cfg, CPU)
    groups = [{"params": [p for p in torch_model.parameters() if p.dim() >= 2], "weight_decay": 0.1}]
    groups.append({"params": [p for p in torch_model.parameters() if p.dim() < 2], "weight_decay": 0.0})
    extra = {"momentum": 0.9} if name == "sgd" else {"betas": (0.9, 0.99), "eps": cfg.eps, "fused": True}
    theirs = reference(groups, lr=0.05, **extra)
    for step in range(5):
        if step == 3:  # resume both from their state dicts into fresh optimisers
            ours_state, their_state = ours.state_dict(), theirs.state_dict()
            assert repr(ours_state) == repr(their_state)
            ours, theirs = make_optimizer(ours_model, cfg, CPU), reference(groups, lr=0.05, **extra)
            ours.load_state_dict(ours_state)
            theirs.load_state_dict(their_state)
        for model in (ours_model, torch_model):
            with_gradients(model, seed=step)
        ours.step()
        theirs.step()
        ours.zero_grad()
        theirs.zero_grad()
        assert all(p.grad is None for p in ours_model.parameters())
    for mine, their in zip(ours_model.parameters(), torch_model.parameters(), strict=True):
        assert torch.equal(mine, their)


def test_training_and_resuming_do_not_import_torch_dynamo(tmp_path, corpus_file):
    """torch.compile's machinery (torch._dynamo, sympy) costs a training start 1.5 to 2 s to import."""
    from conftest import base_config_dict

    raw = base_config_dict(tmp_path / "runs", corpus_file)
    raw["model"] = tiny_model_section("gpt")
    raw["train"].update(max_steps=2, eval_every=1, checkpoint_every=1)
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps(raw))
    script = (
        "import sys\n"
        "from lmzoo.cli import main\n"
        "for extra in ([], ['train.max_steps=3', '--resume']):\n"
        f"    sys.argv = ['lmzoo', 'train', {str(config)!r}, '--no-progress', *extra]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as stop:\n"
        "        assert not stop.code, stop.code\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy', 'torch.distributed.fsdp') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "resum" in result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
