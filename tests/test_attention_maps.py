"""Recorded attention weights (lmzoo.models.attention.record_attention) and `lmzoo attention`: the weights
are the softmax(QK^T / sqrt(d_k)) the model used, computed here by hand from each module's own
projections; causal rows sum to 1 with zeros above the diagonal; recording leaves outputs unchanged."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_section

from lmzoo.models import build_model
from lmzoo.models.attention import MultiHeadAttention, attention_modules, record_attention
from lmzoo.models.base import PAD_ID

VOCAB = 23


def tiny(name: str, vocab=VOCAB, seed: int = 0, **extra):
    torch.manual_seed(seed)
    return build_model(tiny_model_section(name, **extra), vocab).eval()


def capture_inputs(model: torch.nn.Module) -> tuple[dict[str, tuple], dict[str, torch.Tensor], list]:
    """Forward hooks on every attention module: its positional arguments and its output, by name."""
    inputs: dict[str, tuple] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in attention_modules(model):
        handles.append(module.register_forward_pre_hook(lambda _m, args, n=name: inputs.__setitem__(n, args)))
        handles.append(module.register_forward_hook(lambda _m, _a, out, n=name: outputs.__setitem__(n, out)))
    return inputs, outputs, handles


def heads(x: torch.Tensor, count: int) -> torch.Tensor:
    batch, steps, width = x.shape
    return x.view(batch, steps, count, width // count).transpose(1, 2)  # (B, H, T, d_k)


def by_hand(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_k)) with disallowed scores at -inf: the formula, written out."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1)


def assert_causal(weights: torch.Tensor) -> None:
    steps = weights.shape[-1]
    above = torch.ones(steps, steps, dtype=torch.bool).triu(1)
    assert torch.all(weights[..., above] == 0), "a position attended to a later one"
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))


# ---- the modules, against the formula -----------------------------------------------------------------


@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_gpt_weights_are_the_hand_computed_softmax_and_the_ones_used(positions):
    model = tiny("gpt", positions=positions)  # the default SDPA path: recording switches to the explicit one
    ids = torch.randint(4, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain, _ = model(ids)
        inputs, outputs, handles = capture_inputs(model)
        with record_attention(model) as maps:
            recorded_logits, _ = model(ids)
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(recorded_logits, plain, atol=1e-5, rtol=1e-5)  # recording changes nothing
    assert list(maps) == [f"blocks.{i}.attn" for i in range(2)]
    for name, module in attention_modules(model):
        assert isinstance(module, MultiHeadAttention)
        x = inputs[name][0]
        q, k, v = F.linear(x, module.in_proj.weight, module.in_proj.bias).split(module.d_model, dim=-1)
        causal = torch.ones(11, 11, dtype=torch.bool).tril()
        expected = by_hand(heads(q, module.n_heads), heads(k, module.n_heads), causal)
        assert maps.kinds[name] == "decoder"
        assert maps[name].shape == (2, module.n_heads, 11, 11)
        torch.testing.assert_close(maps[name], expected, atol=1e-6, rtol=1e-5)
        assert_causal(maps[name])
        # These weights are the ones the output was made of: out_proj(concat(weights @ V)).
        mixed = (maps[name] @ heads(v, module.n_heads)).transpose(1, 2).reshape(2, 11, module.d_model)
        torch.testing.assert_close(module.out_proj(mixed), outputs[name], atol=1e-5, rtol=1e-5)
    assert all(module._attention_sink is None for _, module in attention_modules(model))


def test_modern_weights_are_the_hand_computed_softmax_with_rope_and_shared_kv_heads():
    model = tiny("modern", n_heads=4, n_kv_heads=2, d_model=16, qk_norm=True)
    ids = torch.randint(4, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain, _ = model(ids)
        inputs, _, handles = capture_inputs(model)
        with record_attention(model) as maps:
            recorded_logits, _ = model(ids)
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(recorded_logits, plain, atol=1e-5, rtol=1e-5)
    for name, module in attention_modules(model):
        x, rope = inputs[name][:2]
        q, k = heads(module.q_proj(x), 4), heads(module.k_proj(x), 2)
        q, k = rope(module.q_norm(q), 0), rope(module.k_norm(k), 0)
        k = k.repeat_interleave(2, dim=1)  # query heads 0,1 read key head 0; 2,3 read key head 1
        expected = by_hand(q, k, torch.ones(9, 9, dtype=torch.bool).tril())
        torch.testing.assert_close(maps[name], expected, atol=1e-6, rtol=1e-5)
        assert maps.kinds[name] == "decoder"
        assert_causal(maps[name])


def test_transformer_records_encoder_decoder_and_cross_attention_with_padding_hidden():
    model = tiny("transformer", vocab=(VOCAB, VOCAB), share_embeddings=False, tie_weights=False)
    src = torch.tensor([[5, 6, 7, 8, 3], [9, 10, 3, PAD_ID, PAD_ID]])
    tgt = torch.tensor([[2, 11, 12, 13], [2, 14, 15, 16]])
    mask = src == PAD_ID
    with torch.no_grad():
        plain, _ = model.decode_hidden(tgt, model.encode(src, mask), mask)
        inputs, _, handles = capture_inputs(model)
        with record_attention(model) as maps:
            recorded, _ = model.decode_hidden(tgt, model.encode(src, mask), mask)
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)
    kinds = {name: maps.kinds[name] for name in maps}
    assert kinds == {
        "encoder_layers.0.self_attn": "self",
        "encoder_layers.1.self_attn": "self",
        "decoder_layers.0.self_attn": "decoder",
        "decoder_layers.0.cross_attn": "cross",
        "decoder_layers.1.self_attn": "decoder",
        "decoder_layers.1.cross_attn": "cross",
    }
    cross = maps["decoder_layers.1.cross_attn"]
    assert cross.shape == (2, 2, 4, 5)
    assert torch.all(cross[1, :, :, 3:] == 0), "padded source positions got attention"
    torch.testing.assert_close(cross.sum(-1), torch.ones(2, 2, 4))
    assert_causal(maps["decoder_layers.0.self_attn"])
    module = dict(attention_modules(model))["decoder_layers.1.cross_attn"]
    queries, memory = inputs["decoder_layers.1.cross_attn"][:2]
    d = module.d_model
    q = heads(F.linear(queries, module.in_proj.weight[:d], module.in_proj.bias[:d]), 2)
    k = heads(F.linear(memory, module.in_proj.weight[d : 2 * d], module.in_proj.bias[d : 2 * d]), 2)
    torch.testing.assert_close(cross, by_hand(q, k, ~mask[:, None, None, :]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["general", "additive"])
def test_rnn_seq2seq_records_its_source_attention(kind):
    model = tiny("seq2seq", vocab=(VOCAB, VOCAB), attention=kind)
    src = torch.tensor([[5, 6, 7, 3], [8, 3, PAD_ID, PAD_ID]])
    tgt = torch.tensor([[2, 9, 10], [2, 11, 12]])
    mask = src == PAD_ID
    with torch.no_grad():
        inputs, _, handles = capture_inputs(model)
        with record_attention(model) as maps:
            model.decode_hidden(tgt, model.encode(src, mask), mask)
        for handle in handles:
            handle.remove()
    assert list(maps) == ["attention"] and maps.kinds["attention"] == "cross"
    query, keys, _, _ = inputs["attention"]
    module = model.attention
    if kind == "general":  # h . W m
        scores = query @ keys.transpose(1, 2)
    else:  # v . tanh(W_h h + W_m m)
        scores = module.v(torch.tanh(module.query_proj(query)[:, :, None] + keys[:, None])).squeeze(-1)
    expected = scores.masked_fill(mask[:, None, :], float("-inf")).softmax(-1)[:, None]
    torch.testing.assert_close(maps["attention"], expected, atol=1e-6, rtol=1e-5)
    assert torch.all(maps["attention"][1, 0, :, 2:] == 0)


def test_models_without_attention_have_no_recording_modules():
    assert attention_modules(tiny("lstm")) == []
    assert attention_modules(tiny("rnn")) == []
