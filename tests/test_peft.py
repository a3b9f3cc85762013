"""LoRA and adapters (lmzoo.models.peft) on every model family: start equal to the base, train only the new
tensors, merge into plain weights, switch off for a reference model, and stay small for the shipped configs."""

from __future__ import annotations

import copy
import fnmatch
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_model_section
from torch import nn
from torch.nn.utils import parametrize

from lmzoo.config.schema import FinetuneConfig
from lmzoo.errors import ConfigError
from lmzoo.models import build_model, list_models
from lmzoo.models.base import PAD_ID
from lmzoo.models.peft import (
    Adapter,
    AdapterAfter,
    LoRA,
    adapters_disabled,
    apply_finetune,
    merge_finetune,
    parameter_counts,
    trainable_state_dict,
)
from lmzoo.models.registry import REFERENCE_VOCAB

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FAMILIES = [info.name for info in list_models()]
VOCAB = 11


def family_config(name: str) -> dict:
    # dropout 0 everywhere so train and eval mode compute the same function
    return tiny_model_section(name, optional={"dropout": 0.0, "bidirectional": True})


def tiny_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    info = next(i for i in list_models() if i.name == name)
    vocab = VOCAB if info.kind == "lm" or name == "transformer" else (VOCAB, VOCAB + 2)
    return build_model(family_config(name), vocab).eval()


def batch_for(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if model.kind == "lm":
        ids = torch.randint(1, VOCAB, (3, 7), generator=g)
        return {"ids": ids, "targets": torch.randint(1, VOCAB, (3, 7), generator=g)}
    src = torch.randint(1, VOCAB, (3, 6), generator=g)
    src[1, 4:] = PAD_ID  # a padded row: the encoder packs it
    tgt_in = torch.randint(1, VOCAB, (3, 5), generator=g)
    return {"src": src, "tgt_in": tgt_in, "targets": torch.randint(1, VOCAB, (3, 5), generator=g)}


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    if model.kind == "lm":
        return model(batch["ids"])[0]
    return model(batch["src"], batch["tgt_in"])[0]


def loss(model: nn.Module, batch: dict) -> torch.Tensor:
    if model.kind == "lm":
        return model(batch["ids"], targets=batch["targets"])[0]
    return model(batch["src"], batch["tgt_in"], targets=batch["targets"])[0]


def lora(model: nn.Module, name: str, **kwargs) -> nn.Module:
    """LoRA on the weights the family names as its default targets."""
    return apply_finetune(model, FinetuneConfig(method="lora", r=2, alpha=4.0, **kwargs))


def adapters(model: nn.Module, name: str) -> nn.Module:
    """Adapters at every site the family offers."""
    return apply_finetune(model, FinetuneConfig(method="adapter", bottleneck=3))


def lora_modules(model: nn.Module) -> dict[str, LoRA]:
    """'owner.attribute' -> its LoRA parametrisation."""
    found = {}
    for owner_name, owner in model.named_modules():
        if parametrize.is_parametrized(owner):
            for attribute, plist in owner.parametrizations.items():
                found[f"{owner_name}.{attribute}".lstrip(".")] = plist[0]
    return found


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_names_lora_targets_and_adapter_sites(name):
    """The model contract: each pattern matches a weight matrix; each site is a submodule of the stated width."""
    model = tiny_model(name)
    matrices = [n for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    assert model.default_lora_targets
    for pattern in model.default_lora_targets:
        assert any(fnmatch.fnmatch(n, pattern) for n in matrices), f"{name}: {pattern} matches no weight"
    sites = model.adapter_sites()
    assert sites, f"{name} offers no adapter site"
    batch = batch_for(model)
    outputs = {}
    hooks = [
        model.get_submodule(site).register_forward_hook(
            lambda module, args, out, site=site: outputs.__setitem__(
                site, out[0] if isinstance(out, tuple) else out
            )
        )
        for site, _ in sites
    ]
    logits(model, batch)
    for hook in hooks:
        hook.remove()
    for site, width in sites:
        assert outputs[site].shape[-1] == width, (
            f"{name}: {site} is {outputs[site].shape[-1]} wide, not {width}"
        )


# ---- 1. LoRA starts equal to the base, trains only its own tensors ----------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_zero_lora_leaves_outputs_unchanged(name):
    base = tiny_model(name)
    expected_targets = sorted(
        n
        for n, p in base.named_parameters()
        if p.dim() >= 2
        and "embedding" not in n
        and any(fnmatch.fnmatch(n, pat) for pat in base.default_lora_targets)
    )
    assert expected_targets, f"{name}: the patterns match nothing"
    batch = batch_for(base)
    before = logits(base, batch)
    adapted = lora(copy.deepcopy(base), name).eval()
    found = lora_modules(adapted)
    assert sorted(found) == expected_targets
    for target, module in found.items():
        assert torch.count_nonzero(module.B) == 0 and torch.count_nonzero(module.A) > 0
        assert module.scale == 2.0  # alpha / r
        owner_name, _, attribute = target.rpartition(".")
        owner = adapted.get_submodule(owner_name)
        # the frozen original is the base weight, and the parametrised weight equals it
        assert torch.equal(owner.parametrizations[attribute].original, base.get_parameter(target))
        assert torch.equal(getattr(owner, attribute), base.get_parameter(target))
    torch.testing.assert_close(logits(adapted, batch), before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "adapter"])
@pytest.mark.parametrize("name", FAMILIES)
def test_only_the_new_tensors_train(name, method):
    model = tiny_model(name)
    base_names = {n for n, _ in model.named_parameters()}
    (lora if method == "lora" else adapters)(model, name)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if method == "lora":
        assert trainable == {
            f"{t.rpartition('.')[0]}.parametrizations.{t.rpartition('.')[2]}.0.{m}".lstrip(".")
            for t in lora_modules(model)
            for m in "AB"
        }
    else:
        assert trainable and all(".adapter." in n for n in trainable)
        assert sum(isinstance(m, AdapterAfter) for m in model.modules()) == len(model.adapter_sites())
    assert set(trainable_state_dict(model)) == trainable
    # every base tensor is still there, frozen (LoRA moves a target under parametrizations.<w>.original)
    renamed = {
        n.replace(".inner.", ".").replace("parametrizations.", "").replace(".original", "") for n in frozen
    }
    assert renamed == base_names

    loss(model, batch_for(model)).backward()
    params = dict(model.named_parameters())
    for n in frozen:
        assert params[n].grad is None, f"{n} got a gradient"
    if method == "lora":
        for module in lora_modules(model).values():
            assert module.B.grad is not None and module.B.grad.abs().sum() > 0
            # dL/dA = scale * B^T dL/dW, and B is zero
            assert module.A.grad is not None and torch.count_nonzero(module.A.grad) == 0
    else:
        for module in (m for m in model.modules() if isinstance(m, Adapter)):
            assert module.up.weight.grad.abs().sum() > 0
            assert torch.count_nonzero(module.down.weight.grad) == 0  # dL/d(down) goes through up = 0


def lstm_lora_count(section: dict, r: int) -> int:
    """r x (in + out) for weight_ih and weight_hh of every layer."""
    hidden, count, width = section["hidden_size"], 0, section["embedding_dim"]
    for _ in range(section["num_layers"]):
        count += r * (width + 4 * hidden) + r * (hidden + 4 * hidden)
        width = hidden
    return count


def gpt_lora_count(section: dict, r: int) -> int:
    d = section["d_model"]
    return section["n_layers"] * (r * (d + 3 * d) + r * (d + d))  # in_proj (3d x d), out_proj (d x d)


def gpt_adapter_count(section: dict, bottleneck: int) -> int:
    d = section["d_model"]
    return section["n_layers"] * (d * bottleneck + bottleneck + bottleneck * d + d)


@pytest.mark.parametrize(
    ("finetune_file", "base_file", "expected"),
    [
        ("gpt_lora.yaml", "gpt.yaml", gpt_lora_count),
        ("gpt_dpo.yaml", "gpt.yaml", gpt_lora_count),
        ("gpt_adapter.yaml", "gpt.yaml", gpt_adapter_count),
        ("lstm_lora.yaml", "lstm.yaml", lstm_lora_count),
    ],
)
def test_shipped_finetune_configs_train_at_most_five_percent(finetune_file, base_file, expected):
    finetune_raw = yaml.safe_load((CONFIGS / finetune_file).read_text())
    base_raw = yaml.safe_load((CONFIGS / base_file).read_text())
    assert Path(finetune_raw["init_from"]).name == Path(base_file).stem  # the config it says it fine-tunes
    finetune = FinetuneConfig(**finetune_raw["finetune"])
    model = build_model(base_raw["model"], REFERENCE_VOCAB)
    _, base_total = parameter_counts(model)
    apply_finetune(model, finetune)
    trainable, total = parameter_counts(model)
    size = finetune.r if finetune.method == "lora" else finetune.bottleneck
    assert trainable == expected(base_raw["model"], size)
    assert total == base_total + trainable
    assert trainable / total <= 0.05, f"{finetune_file}: {trainable / total:.2%} trainable"


def test_lora_and_adapter_misconfigurations_are_one_line_errors():
    with pytest.raises(ConfigError) as info:
        apply_finetune(tiny_model("lstm"), FinetuneConfig(method="lora", targets=["*attn.in_proj.weight"]))
    assert "match no weight" in str(info.value) and "layers.0.weight_hh_l0" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        apply_finetune(tiny_model("lstm"), FinetuneConfig(method="adapter", sites=["blocks.*"]))
    assert (
        "finetune.sites" in str(info.value) and "layers.0" in str(info.value) and "\n" not in str(info.value)
    )
    # LoRA never adapts an embedding, even when a pattern matches it
    with pytest.raises(ConfigError):
        apply_finetune(tiny_model("gpt"), FinetuneConfig(method="lora", targets=["*embedding.weight"]))


# ---- 2. merging ---------------------------------------------------------------------------------------


def randomize_lora(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.B.copy_(0.3 * torch.randn(module.B.shape, generator=g))


@pytest.mark.parametrize("name", ["gpt", "lstm"])
def test_merge_gives_the_adapted_outputs(name):
    base = tiny_model(name)
    model = lora(copy.deepcopy(base), name).eval()
    randomize_lora(model)
    batch = batch_for(model)
    adapted = logits(model, batch)
    assert not torch.allclose(adapted, logits(base, batch), atol=1e-3)  # B != 0 does change the model
    folded = {}
    for target, module in lora_modules(model).items():
        folded[target] = base.get_parameter(target) + module.scale * module.B.detach() @ module.A.detach()
    merge_finetune(model)
    assert not lora_modules(model) and not any(isinstance(m, LoRA) for m in model.modules())
    assert sorted(model.state_dict()) == sorted(base.state_dict())  # plain names again
    assert all(p.requires_grad for p in model.parameters())
    for target, weight in folded.items():
        torch.testing.assert_close(model.get_parameter(target), weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, batch), adapted, rtol=0, atol=1e-5)
    if name == "lstm":  # nn.LSTM's cached weight list points at the merged parameters
        for layer in model.layers:
            for flat, weight_name in zip(layer._flat_weights, layer._flat_weights_names, strict=True):
                assert flat is getattr(layer, weight_name)


# ---- 3. LoRA inside nn.LSTM ------------------------------------------------------------------------------


def test_lora_on_lstm_recurrent_weights_trains_through_the_fused_kernel():
    model = lora(tiny_model("lstm"), "lstm").train()
    names = dict(model.named_parameters())
    for layer in ("layers.0", "layers.1"):
        for weight in ("weight_ih_l0", "weight_hh_l0"):
            assert not names[f"{layer}.parametrizations.{weight}.original"].requires_grad
            assert names[f"{layer}.parametrizations.{weight}.0.A"].requires_grad
            assert names[f"{layer}.parametrizations.{weight}.0.B"].requires_grad
    assert not any(n.endswith(".weight_hh_l0") for n in names)  # only the parametrised path remains
    batch = batch_for(model)
    for layer in model.layers:
        assert isinstance(layer, nn.LSTM)  # parametrize makes a subclass; nn.LSTM.forward still runs

    def check_flat_weights() -> None:
        for layer in model.layers:
            for flat, weight_name in zip(layer._flat_weights, layer._flat_weights_names, strict=True):
                if weight_name.startswith("weight_"):
                    plist = layer.parametrizations[weight_name]
                    expected = plist.original + plist[0].scale * plist[0].B @ plist[0].A
                    assert (
                        flat is not plist.original and flat.grad_fn is not None
                    )  # computed by the parametrisation
                    torch.testing.assert_close(flat, expected, rtol=0, atol=1e-6)
                else:
                    assert flat is getattr(layer, weight_name)  # biases stay plain (frozen) parameters

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        before = logits(model, batch).detach()
    ops = {event.name for event in prof.events()}
    assert "aten::lstm" in ops, "nn.LSTM should call the fused aten::lstm kernel"
    check_flat_weights()
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss(model, batch).backward()
    optimizer.step()
    after = logits(model, batch).detach()
    assert (after - before).abs().max() > 1e-4, "one step on B should change the output"
    check_flat_weights()  # the next forward used the updated B
    for n, p in model.named_parameters():
        if n in originals:
            assert torch.equal(p, originals[n]), f"frozen {n} changed"


# ---- 4. adapters, and switching LoRA / adapters off ----------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_zero_initialised_adapters_leave_outputs_unchanged(name):
    base = tiny_model(name)
    batch = batch_for(base)
    model = adapters(copy.deepcopy(base), name).eval()
    for module in (m for m in model.modules() if isinstance(m, Adapter)):
        assert torch.count_nonzero(module.up.weight) == 0 and torch.count_nonzero(module.up.bias) == 0
        assert module.down.out_features == 3
    torch.testing.assert_close(logits(model, batch), logits(base, batch), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "adapter"])
@pytest.mark.parametrize("name", ["gpt", "lstm", "transformer"])
def test_disabling_the_new_tensors_gives_exactly_the_base_outputs(name, method):
    base = tiny_model(name)
    batch = batch_for(base)
    with torch.no_grad():  # (nn.LSTM's CPU kernel rounds differently with and without autograd)
        expected = logits(base, batch)
    model = (lora if method == "lora" else adapters)(copy.deepcopy(base), name).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(2):  # two steps: after the first only B / up has moved
        loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = logits(model, batch)
    assert (trained - expected).abs().max() > 1e-4
    with torch.no_grad(), adapters_disabled(model):
        assert torch.equal(logits(model, batch), expected)
    with torch.no_grad():
        assert torch.equal(logits(model, batch), trained)  # switched back on
    with pytest.raises(RuntimeError), adapters_disabled(model):
        raise RuntimeError("boom")
    assert all(m.enabled for m in model.modules() if isinstance(m, (LoRA, Adapter)))


def test_lora_rank_dropout_only_in_training():
    """Rank dropout drops whole components of B A (scaled by 1 / (1 - p)) in training, none in eval."""
    import itertools

    model = apply_finetune(tiny_model("gpt"), FinetuneConfig(method="lora", r=4, alpha=4.0, dropout=0.5))
    randomize_lora(model)
    module = next(iter(lora_modules(model).values()))
    with torch.no_grad():
        exact = (module.scale * module.B @ module.A).view(module.shape)
        module.eval()
        assert torch.equal(module.delta(), exact)
        module.train()
        subsets = {
            kept: module.scale * module.B[:, list(kept)] @ module.A[list(kept)] / 0.5
            for n in range(5)
            for kept in itertools.combinations(range(4), n)
        }
        torch.manual_seed(0)
        seen = set()
        for _ in range(30):
            delta = module.delta()
            matches = [kept for kept, value in subsets.items() if torch.allclose(delta, value, atol=1e-6)]
            assert len(matches) == 1, "a training delta must keep a subset of the rank components"
            seen.add(matches[0])
        assert len(seen) > 3  # it does drop different components from draw to draw
