"""Every registered model family, plus the rnn family's layer against torch.nn.RNN and the heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_section
from pydantic import ValidationError

from lmzoo.config import ModelConfig
from lmzoo.errors import ConfigError
from lmzoo.models import (
    build_model,
    count_parameters,
    get_model_info,
    list_models,
    register_model,
)
from lmzoo.models.base import PAD_ID, LanguageModel, Seq2SeqModel, detach_state
from lmzoo.models.recurrent import ElmanRNN

VOCAB = 23
ALL_MODELS = [info.name for info in list_models()]
LM_MODELS = [info.name for info in list_models() if info.kind == "lm"]


def tiny_model(name: str, vocab: int = VOCAB, seed: int = 0, **extra) -> LanguageModel:
    torch.manual_seed(seed)
    return build_model(tiny_model_section(name, **extra), vocab)


def test_registry_has_the_recurrent_families():
    assert {"rnn", "lstm", "gru"} <= set(ALL_MODELS)
    assert ALL_MODELS == sorted(ALL_MODELS)
    for info in list_models():
        assert get_model_info(info.name) is info and info.description
        # the kind comes from the class, and registration teaches it to the config class
        assert info.kind == info.cls.kind == info.config.kind
        assert issubclass(info.cls, LanguageModel if info.kind == "lm" else Seq2SeqModel)
        assert info.default_config().name == info.name
        with pytest.raises(ValidationError):  # a config class accepts its own family's name only
            info.config(name="rnn" if info.name != "rnn" else "lstm")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_tiny_sections_are_tiny_and_unknown_knobs_fail(name):
    """The tests' model sizes come from each family's tiny_config: a renamed knob must fail, not run at
    full size. `optional=` keys are dropped only where the family has no such option."""
    section = tiny_model_section(name, optional={"dropout": 0.1, "no_such_knob": 3})
    assert "no_such_knob" not in section
    assert ("dropout" in section) == ("dropout" in get_model_info(name).config.model_fields)
    vocab = VOCAB if get_model_info(name).kind == "lm" else (VOCAB, VOCAB)
    assert count_parameters(build_model(section, vocab)) < 20_000  # the defaults are 250k parameters and up
    with pytest.raises(ConfigError, match="model.n_layer: unknown key"):
        build_model(tiny_model_section(name, n_layer=1), vocab)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_builds_from_dict_and_from_config(name):
    model = tiny_model(name)
    info = get_model_info(name)
    assert isinstance(model, info.cls) and model.kind == info.kind
    again = build_model(info.config.model_validate(tiny_model_section(name)), VOCAB)
    assert count_parameters(again) == count_parameters(model) > 0


def test_unknown_model_and_duplicate_registration():
    with pytest.raises(ConfigError, match="known models: .*lstm"):
        get_model_info("transformerz")
    with pytest.raises(ValueError, match="registered twice"):
        register_model("lstm", config=ModelConfig, kind="lm", description="dup")(
            type("Dup", (torch.nn.Module,), {})
        )
    assert get_model_info("lstm").cls.__name__ == "LSTMLM"


@pytest.mark.parametrize("name", LM_MODELS)
def test_forward_shapes_and_finite_outputs(name):
    model = tiny_model(name).eval()
    ids = torch.randint(0, VOCAB, (3, 7))
    logits, _state = model(ids)
    assert logits.shape == (3, 7, VOCAB)
    assert torch.isfinite(logits).all()
    targets = torch.randint(1, VOCAB, (3, 7))
    loss, _ = model(ids, targets=targets)
    assert loss.shape == () and torch.isfinite(loss)
    # The loss is the mean cross-entropy of the logits (full softmax).
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-5)
    # An untrained model is close to uniform: the loss is near log(V).
    assert abs(loss.item() - torch.log(torch.tensor(float(VOCAB))).item()) < 1.0


@pytest.mark.parametrize("name", LM_MODELS)
def test_loss_ignores_padding(name):
    model = tiny_model(name).eval()
    ids = torch.randint(0, VOCAB, (2, 6))
    targets = torch.randint(1, VOCAB, (2, 6))
    targets[0, :3] = PAD_ID
    logits, _ = model(ids)
    loss, _ = model(ids, targets=targets)
    keep = targets != PAD_ID
    expected = F.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(loss, expected, atol=1e-5)


@pytest.mark.parametrize("name", LM_MODELS)
def test_every_parameter_gets_a_nonzero_gradient(name):
    model = build_model(tiny_model_section(name, optional={"dropout": 0.1}), VOCAB)
    model.train()
    ids = torch.stack([torch.randperm(VOCAB), torch.randperm(VOCAB)])  # every token appears
    targets = torch.roll(ids, -1, dims=1)
    loss, _ = model(ids, targets=targets)
    loss.backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, f"{pname} got an all-zero gradient"


@pytest.mark.parametrize("name", LM_MODELS)
def test_stepping_token_by_token_equals_full_forward(name):
    model = tiny_model(name).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        full, _ = model(ids)
        state, steps = model.init_state(2), []  # the decoding state (None for recurrent models)
        for t in range(ids.shape[1]):
            logits, state = model(ids[:, t : t + 1], state)
            steps.append(logits)
        # Also: a prompt chunk, then single tokens (how generation feeds the model).
        prompt_logits, state2 = model(ids[:, :4], model.init_state(2))
        rest = []
        for t in range(4, ids.shape[1]):
            logits, state2 = model(ids[:, t : t + 1], state2)
            rest.append(logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert torch.allclose(torch.cat([prompt_logits, *rest], dim=1), full, atol=1e-5)


@pytest.mark.parametrize("name", LM_MODELS)
def test_dropout_is_off_in_eval_mode(name):
    fields = get_model_info(name).config.model_fields
    if "dropout" not in fields:
        pytest.skip("family has no dropout option")
    model = tiny_model(name, dropout=0.5)
    ids = torch.randint(0, VOCAB, (2, 5))
    model.eval()
    assert torch.equal(model(ids)[0], model(ids)[0])
    model.train()
    assert not torch.equal(model(ids)[0], model(ids)[0])


@pytest.mark.parametrize("name", LM_MODELS)
def test_state_can_be_detached(name):
    model = tiny_model(name)
    _, state = model(torch.randint(0, VOCAB, (2, 4)))
    detached = detach_state(state)

    def tensors(s):
        if isinstance(s, torch.Tensor):
            yield s
        elif isinstance(s, (list, tuple)):
            for item in s:
                yield from tensors(item)
        elif isinstance(s, dict):
            for item in s.values():
                yield from tensors(item)

    originals, copies = list(tensors(state)), list(tensors(detached))
    assert len(originals) == len(copies)
    for original, copy in zip(originals, copies, strict=True):
        assert not copy.requires_grad and torch.equal(original, copy)


# ---- the rnn family's layer is exactly an Elman RNN ---------------------------------------------


@pytest.mark.parametrize("with_h0", [False, True])
def test_elman_rnn_equals_torch_rnn(with_h0):
    torch.manual_seed(0)
    ours = ElmanRNN(5, 7, "tanh")
    ref = torch.nn.RNN(5, 7, num_layers=1, nonlinearity="tanh", batch_first=True)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(ours.weight_ih)
        ref.weight_hh_l0.copy_(ours.weight_hh)
        ref.bias_ih_l0.copy_(ours.bias)
        ref.bias_hh_l0.zero_()
    x = torch.randn(3, 11, 5)
    h0 = torch.randn(3, 7) if with_h0 else None
    out, h = ours(x, h0)
    ref_out, ref_h = ref(x, None if h0 is None else h0[None])
    assert out.shape == (3, 11, 7) and h.shape == (3, 7)
    assert torch.allclose(out, ref_out, atol=1e-6)
    assert torch.allclose(h, ref_h[0], atol=1e-6)
    assert torch.equal(out[:, -1], h)


def test_elman_rnn_relu_matches_the_formula():
    torch.manual_seed(1)
    layer = ElmanRNN(3, 4, "relu")
    x = torch.randn(2, 5, 3)
    out, _ = layer(x)
    h = torch.zeros(2, 4)
    for t in range(5):
        h = torch.relu(x[:, t] @ layer.weight_ih.T + h @ layer.weight_hh.T + layer.bias)
        assert torch.allclose(out[:, t], h, atol=1e-6)


def test_rnn_family_uses_elman_layers():
    model = tiny_model("rnn", nonlinearity="relu")
    assert all(isinstance(layer, ElmanRNN) for layer in model.layers)
    assert model.layers[0].act is torch.relu


# ---- heads: tying and adaptive softmax ----------------------------------------------------------


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("hidden", [8, 16])
def test_tie_weights_shares_the_tensor(name, hidden):
    tied = tiny_model(name, hidden_size=hidden, embedding_dim=8, tie_weights=True)
    untied = tiny_model(name, hidden_size=hidden, embedding_dim=8, tie_weights=False)
    assert tied.head.proj.weight is tied.embedding.weight
    assert tied.head.proj.weight.data_ptr() == tied.embedding.weight.data_ptr()
    # Counted once: tying saves the V x H output matrix (but adds an H -> E projection when sizes differ).
    extra = 0 if hidden == 8 else hidden * 8
    assert count_parameters(untied) - count_parameters(tied) == VOCAB * hidden - extra
    # Training the embedding moves the output layer too.
    with torch.no_grad():
        tied.embedding.weight[5].add_(1.0)
    assert torch.equal(tied.head.proj.weight[5], tied.embedding.weight[5])


def test_tie_weights_with_adaptive_softmax_is_a_config_error():
    with pytest.raises(ConfigError, match="tie_weights needs softmax: full"):
        tiny_model(
            "lstm",
            vocab=50,
            embedding_dim=32,
            hidden_size=32,
            tie_weights=True,
            softmax="adaptive",
            adaptive_cutoffs=[10, 30],
        )


def test_adaptive_cutoffs_beyond_the_vocabulary_are_a_config_error():
    with pytest.raises(ConfigError, match="adaptive_cutoffs"):
        tiny_model("lstm", vocab=20, softmax="adaptive", adaptive_cutoffs=[10, 30])


@pytest.mark.parametrize("name", ["rnn", "lstm", "gru"])
def test_adaptive_softmax_loss_equals_negative_log_prob(name):
    vocab = 50
    model = tiny_model(
        name, vocab=vocab, hidden_size=32, softmax="adaptive", adaptive_cutoffs=[10, 30]
    ).eval()
    ids = torch.randint(0, vocab, (3, 8))
    targets = torch.randint(1, vocab, (3, 8))
    targets[:, 0] = torch.tensor([2, 15, 45])  # one target in each cluster
    targets[1, 5] = PAD_ID
    with torch.no_grad():
        log_probs, _ = model(ids)  # the adaptive head's logits are log-probabilities
        loss, _ = model(ids, targets=targets)
    assert log_probs.shape == (3, 8, vocab)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(3, 8), atol=1e-5)
    keep = targets != PAD_ID
    picked = log_probs.gather(-1, targets[..., None])[..., 0]
    assert torch.allclose(loss, -picked[keep].mean(), atol=1e-5)
