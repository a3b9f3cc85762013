"""The modern decoder (LLaMA-style): RoPE, RMSNorm and SwiGLU against their formulas, grouped-query
attention against attention computed by hand, both attention paths, the causal mask, KV-cache decoding
within and past the context, weight tying, parameter and FLOP counts, configs, and a model that learns."""

from __future__ import annotations

import fnmatch
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from lmzoo.errors import ConfigError
from lmzoo.inference.decoding import generate_ids
from lmzoo.inference.sampling import SamplingOptions
from lmzoo.models import build_model, count_parameters, tiny_model_config
from lmzoo.models.modern import (
    GroupedQueryAttention,
    ModernConfig,
    ModernDecoder,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    swiglu_hidden_size,
)

torch.set_num_threads(1)

VOCAB = 23
ATTENTION_PATHS = ["sdpa", "explicit"]
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def tiny_modern(seed: int = 0, **extra) -> ModernDecoder:
    torch.manual_seed(seed)
    return build_model(tiny_model_config("modern", **extra), VOCAB).eval()


def random_ids(seed: int, batch: int, steps: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, steps), generator=torch.Generator().manual_seed(seed))


# ---- RoPE -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", [10000.0, 500.0])
def test_rope_matches_the_formula(base):
    head_dim, steps = 6, 5
    rope = RotaryEmbedding(head_dim, 16, base)
    x = torch.randn(2, 3, steps, head_dim)
    expected = torch.zeros_like(x, dtype=torch.float64)
    for pos in range(steps):
        for i in range(head_dim // 2):
            angle = pos * base ** (-2 * i / head_dim)
            a, b = x[..., pos, 2 * i].double(), x[..., pos, 2 * i + 1].double()
            expected[..., pos, 2 * i] = a * math.cos(angle) - b * math.sin(angle)
            expected[..., pos, 2 * i + 1] = a * math.sin(angle) + b * math.cos(angle)
    assert torch.allclose(rope(x).double(), expected, atol=1e-6)
    assert torch.equal(rope(x)[..., 0, :], x[..., 0, :])  # position 0 is not rotated
    # An offset start rotates by the absolute positions start, start+1, ... (what the KV cache relies on).
    assert torch.allclose(rope(x[..., 2:, :], start=2).double(), expected[..., 2:, :], atol=1e-6)
    # A rotation keeps each pair's length.
    assert torch.allclose(rope(x).norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_rope_scores_depend_only_on_the_offset():
    head_dim, length = 8, 20
    rope = RotaryEmbedding(head_dim, length)
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    rotated_q = rope(q.expand(1, 1, length, head_dim))[0, 0]  # (L, d): q at every position
    rotated_k = rope(k.expand(1, 1, length, head_dim))[0, 0]

    def score(m: int, n: int) -> torch.Tensor:
        return rotated_q[m] @ rotated_k[n]

    for m, n, shift in [(3, 1, 5), (0, 0, 7), (2, 9, 10), (12, 4, 3)]:
        assert torch.allclose(score(m, n), score(m + shift, n + shift), atol=1e-5)
    # ... and does depend on the offset (the positions are not simply ignored).
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)


# ---- RMSNorm and SwiGLU ---------------------------------------------------------------------------


def test_rmsnorm_matches_the_formula():
    eps = 1e-3
    norm = RMSNorm(7, eps)
    assert torch.equal(norm.weight, torch.ones(7))
    with torch.no_grad():
        norm.weight.copy_(torch.randn(7))
    x = torch.randn(3, 4, 7) * 0.1  # small values: eps matters
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight
    assert torch.allclose(norm(x), expected, atol=1e-6)
    without_eps = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True)) * norm.weight
    assert not torch.allclose(norm(x), without_eps, atol=1e-4)


@pytest.mark.parametrize(
    ("d_model", "multiple", "hidden"),
    # round(8/3 * d) rounded up to the multiple: 341.3 -> 352, 42.7 -> 64, 1024 -> 1024, 266.7 -> 267 -> 272
    [(128, 32, 352), (16, 32, 64), (384, 32, 1024), (100, 8, 272), (100, 1, 267)],
)
def test_swiglu_hidden_size_rule(d_model, multiple, hidden):
    assert swiglu_hidden_size(d_model, multiple) == hidden
    config = ModernConfig(d_model=d_model, n_heads=2, ff_multiple_of=multiple)
    assert config.ff_hidden == hidden
    model = build_model(
        {"name": "modern", "d_model": d_model, "n_heads": 2, "n_layers": 1, "ff_multiple_of": multiple}, VOCAB
    )
    assert model.blocks[0].ff.up.out_features == hidden
    assert ModernConfig(d_model=d_model, n_heads=2, d_ff=40).ff_hidden == 40  # an explicit d_ff wins


def test_swiglu_forward_is_down_of_silu_gate_times_up():
    torch.manual_seed(0)
    ff = SwiGLU(8, 12, dropout=0.0)
    x = torch.randn(2, 5, 8)
    gate, up = x @ ff.gate.weight.T, x @ ff.up.weight.T
    expected = (gate * torch.sigmoid(gate) * up) @ ff.down.weight.T  # silu(a) = a * sigmoid(a)
    assert torch.allclose(ff(x), expected, atol=1e-6)
    assert all(layer.bias is None for layer in (ff.gate, ff.up, ff.down))


# ---- the causal mask ------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ATTENTION_PATHS)
@pytest.mark.parametrize("seed", [0, 1])
def test_changing_later_tokens_leaves_earlier_logits_unchanged(attention, seed):
    model = tiny_modern(seed, attention=attention, qk_norm=seed == 1)
    generator = torch.Generator().manual_seed(100 + seed)
    ids = torch.randint(0, VOCAB, (2, 12), generator=generator)
    with torch.no_grad():
        logits, _ = model(ids)
        for t in (0, 3, 7, 10):
            changed = ids.clone()
            changed[:, t + 1 :] = torch.randint(0, VOCAB, (2, 11 - t), generator=generator)
            assert not torch.equal(changed[:, t + 1 :], ids[:, t + 1 :])
            other, _ = model(changed)
            assert torch.equal(other[:, : t + 1], logits[:, : t + 1]), f"position <= {t} saw a later token"
            assert not torch.allclose(other[:, t + 1 :], logits[:, t + 1 :])  # the test would catch a leak


# ---- attention: by hand, GQA, both paths ----------------------------------------------------------


def attention_by_hand(layer: GroupedQueryAttention, x: torch.Tensor, base: float) -> torch.Tensor:
    """Multi-head causal attention with RoPE, head by head (RoPE as complex rotations)."""
    batch, steps, _ = x.shape
    hd, heads = layer.head_dim, layer.n_heads
    angles = torch.arange(steps)[:, None] * base ** (-torch.arange(0, hd, 2) / hd)[None, :]  # (T, hd/2)
    turn = torch.polar(torch.ones_like(angles), angles)  # e^{i angle}

    def rotate(t: torch.Tensor) -> torch.Tensor:  # (B, T, hd)
        pairs = torch.view_as_complex(t.reshape(batch, steps, hd // 2, 2))  # (B, T, hd/2) complex
        return torch.view_as_real(pairs * turn).flatten(-2)

    q_all, k_all, v_all = x @ layer.q_proj.weight.T, x @ layer.k_proj.weight.T, x @ layer.v_proj.weight.T
    blocked = torch.ones(steps, steps, dtype=torch.bool).triu(1)
    outputs = []
    for h in range(heads):
        part = slice(h * hd, (h + 1) * hd)
        q, k, v = rotate(q_all[..., part]), rotate(k_all[..., part]), v_all[..., part]
        scores = (q @ k.transpose(1, 2) / math.sqrt(hd)).masked_fill(blocked, float("-inf"))
        outputs.append(scores.softmax(-1) @ v)
    return torch.cat(outputs, dim=-1) @ layer.o_proj.weight.T


@pytest.mark.parametrize("attention", ATTENTION_PATHS)
def test_attention_with_as_many_kv_heads_as_heads_equals_multi_head_attention_by_hand(attention):
    config = ModernConfig(d_model=12, n_heads=3, n_kv_heads=3, attention=attention, rope_base=100.0)
    torch.manual_seed(1)
    layer = GroupedQueryAttention(config).eval()
    rope = RotaryEmbedding(4, 16, 100.0)
    x = torch.randn(2, 7, 12)
    with torch.no_grad():
        assert torch.allclose(layer(x, rope), attention_by_hand(layer, x, 100.0), atol=1e-5)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize(("heads", "kv"), [(3, 1), (4, 2)])
def test_grouped_kv_heads_equal_every_query_head_reading_a_copy_of_its_groups_head(heads, kv, qk_norm):
    """GQA: query head h reads K/V head h // (heads / kv); copying that head gives multi-head attention."""
    d, hd = 8 * heads, 8
    grouped = tiny_modern(2, n_kv_heads=kv, qk_norm=qk_norm, d_model=d, n_heads=heads)
    plain = tiny_modern(3, n_kv_heads=heads, qk_norm=qk_norm, d_model=d, n_heads=heads)
    state = grouped.state_dict()
    for name, tensor in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # (kv * hd, d) -> (heads * hd, d)
            state[name] = tensor.view(kv, hd, d).repeat_interleave(heads // kv, dim=0).reshape(heads * hd, d)
    plain.load_state_dict(state)
    ids = random_ids(4, 2, 10)
    with torch.no_grad():
        assert torch.allclose(grouped(ids)[0], plain(ids)[0], atol=1e-5)
    saved = 2 * 2 * (d * (heads - kv) * hd)  # 2 layers x (K, V) x the missing heads
    assert count_parameters(plain) - count_parameters(grouped) == saved


@pytest.mark.parametrize("extra", [{}, {"qk_norm": True}, {"qk_norm": True, "n_kv_heads": 2}], ids=str)
def test_sdpa_path_equals_explicit_path(extra):
    fused = tiny_modern(6, attention="sdpa", **extra)
    explicit = tiny_modern(99, attention="explicit", **extra)
    explicit.load_state_dict(fused.state_dict())
    ids = random_ids(6, 2, 11)
    with torch.no_grad():
        expected = explicit(ids)[0]
        assert torch.allclose(fused(ids)[0], expected, atol=1e-5)
        # ... and with a cache: a prompt, then a chunk of 3 (an offset causal mask), then one token.
        outputs = []
        for model in (fused, explicit):
            state = model.init_state(2)
            chunks = [model(ids[:, :5], state)[0], model(ids[:, 5:8], state)[0], model(ids[:, 8:9], state)[0]]
            outputs.append(torch.cat(chunks, dim=1))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    assert torch.allclose(outputs[1], expected[:, :9], atol=1e-5)


def test_qk_norm_normalises_each_heads_query_and_key():
    model = tiny_modern(7, qk_norm=True)
    attn = model.blocks[0].attn
    assert attn.q_norm.weight.shape == (attn.head_dim,) and attn.k_norm.weight.shape == (attn.head_dim,)
    other = tiny_modern(7, qk_norm=True)
    with torch.no_grad():
        other.blocks[0].attn.q_norm.weight.mul_(3.0)  # the gain is used: sharper attention, other logits
    ids = random_ids(8, 1, 9)
    with torch.no_grad():
        assert not torch.allclose(model(ids)[0], other(ids)[0], atol=1e-4)
    assert tiny_modern(7).blocks[0].attn.q_norm is None


# ---- KV-cache decoding, within and past the context -----------------------------------------------


@pytest.mark.parametrize("attention", ATTENTION_PATHS)
@pytest.mark.parametrize("extra", [{}, {"n_kv_heads": 2, "qk_norm": True}], ids=["gqa1", "mha+qknorm"])
def test_cached_decoding_equals_full_forward_past_the_context(attention, extra):
    context = 8
    model = tiny_modern(7, attention=attention, context_length=context, **extra)
    history = random_ids(8, 2, 23)
    prompt = 3
    with torch.no_grad():
        logits, state = model(history[:, :prompt], model.init_state(2))
        full, _ = model(history[:, :prompt])
        assert torch.allclose(logits, full, atol=1e-5)
        slid = False
        for t in range(prompt, history.shape[1]):
            step, state = model(history[:, t : t + 1], state)
            assert step.shape == (2, 1, VOCAB)
            window = state.ids
            assert 1 <= window.shape[1] <= context
            assert torch.equal(window, history[:, t + 1 - window.shape[1] : t + 1])
            assert all(cache.length == window.shape[1] for cache in state.caches)
            # GQA: the cache holds only the K/V heads
            assert all(cache.k.shape[1] == model.config.kv_heads for cache in state.caches)
            slid |= window.shape[1] < t + 1
            reference, _ = model(window)  # a fresh forward over the kept window: positions from 0
            assert torch.allclose(step[:, 0], reference[:, -1], atol=1e-5), f"step {t}"
            if t + 1 <= context:
                whole, _ = model(history[:, : t + 1])
                assert torch.allclose(step[:, 0], whole[:, -1], atol=1e-5)
    assert slid, "the window never slid: the test did not go past the context"


def test_a_chunk_that_crosses_the_context_is_decoded_over_the_kept_window():
    context = 8
    model = tiny_modern(9, context_length=context)
    ids = random_ids(10, 1, 14)
    with torch.no_grad():
        _, state = model(ids[:, :6], model.init_state(1))
        chunk, state = model(ids[:, 6:10], state)  # 6 + 4 > 8: the window slides during a chunk
        assert chunk.shape == (1, 4, VOCAB)
        kept = state.ids
        assert torch.equal(kept, ids[:, 10 - kept.shape[1] : 10])
        reference, _ = model(kept)
    assert torch.allclose(chunk, reference[:, -4:], atol=1e-5)


def test_generation_past_the_context_and_too_long_inputs():
    context = 8
    model = tiny_modern(11, context_length=context)
    prompt = random_ids(12, 1, 30)[0].tolist()
    options = SamplingOptions(max_new_tokens=12, greedy=True)
    out = list(generate_ids(model, prompt, options))
    assert len(out) == 12 and out == list(generate_ids(model, prompt[-context:], options))
    with torch.no_grad():
        first, _ = model(torch.tensor([prompt[-context:]]))
    assert out[0] == int(first[0, -1].argmax())
    for state in (None, model.init_state(1)):
        with pytest.raises(ValueError, match="longer than the context length"):
            model(torch.tensor([prompt]), state)


# ---- weights, counts, contract --------------------------------------------------------------------


def expected_parameters(
    v: int, d: int, heads: int, kv: int, layers: int, ff: int, qk_norm: bool, tied: bool
) -> int:
    """Embedding + per block (2 norms, Q, K, V, O, 3 SwiGLU matrices, QK-norm gains) + final norm [+ head]."""
    hd = d // heads
    attention = d * heads * hd + 2 * d * kv * hd + heads * hd * d
    block = 2 * d + attention + 3 * d * ff + (2 * hd if qk_norm else 0)
    return v * d + layers * block + d + (0 if tied else v * d)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_weight_tying_and_parameter_count(tied, qk_norm):
    model = tiny_modern(
        0, d_model=24, n_heads=4, n_kv_heads=2, n_layers=3, d_ff=40, tie_weights=tied, qk_norm=qk_norm
    )
    shared = model.head.proj.weight.data_ptr() == model.token_embedding.weight.data_ptr()
    assert shared == tied and (model.head.proj.weight is model.token_embedding.weight) == tied
    assert count_parameters(model) == expected_parameters(VOCAB, 24, 4, 2, 3, 40, qk_norm, tied)
    assert all(p.dim() != 1 or "norm" in name for name, p in model.named_parameters())  # no bias anywhere


def test_initialisation():
    model = tiny_modern(0, d_model=64, n_heads=4, n_layers=8, d_ff=128)
    scaled = 0.02 / math.sqrt(16)
    for name, param in model.named_parameters():
        if param.dim() == 1:
            assert torch.equal(param, torch.ones_like(param)), name
        else:
            std = scaled if name.endswith(("o_proj.weight", "ff.down.weight")) else 0.02
            assert abs(param.std().item() - std) < 0.15 * std, name


def test_flops_lora_targets_adapter_sites_and_state():
    model = tiny_modern(0, n_layers=2, d_model=16, n_heads=2, n_kv_heads=1, d_ff=32)
    d, hd, kv, ff, seq = 16, 8, 1, 32, 32
    per_layer = 2 * (d * d + 2 * d * kv * hd + d * d + 3 * d * ff) + 4 * seq * d
    assert model.flops_per_token(seq) == 2 * per_layer + 2 * d * VOCAB
    matched = [
        n
        for n, _ in model.named_parameters()
        if any(fnmatch.fnmatch(n, p) for p in ModernDecoder.default_lora_targets)
    ]
    assert sorted(matched) == sorted(f"blocks.{i}.attn.{w}_proj.weight" for i in range(2) for w in "qkvo")
    for name, width in model.adapter_sites():
        assert isinstance(model.get_submodule(name), SwiGLU) and width == d
    assert len(model.adapter_sites()) == 2
    assert model.fsdp_units() == {type(model.blocks[0])}
    assert model.context_len == 32 and model.kind == "lm" and not model.carries_state
    assert model.init_state(3).length == 0


def test_config_checks():
    with pytest.raises(ConfigError, match=r"n_heads \(3\) must divide d_model \(16\)"):
        build_model(tiny_model_config("modern", n_heads=3), VOCAB)
    with pytest.raises(ConfigError, match=r"n_kv_heads \(3\) must divide n_heads \(4\)"):
        build_model(tiny_model_config("modern", n_heads=4, n_kv_heads=3), VOCAB)
    with pytest.raises(ConfigError, match="must be even"):
        build_model(tiny_model_config("modern", d_model=18, n_heads=2), VOCAB)
    config = ModernConfig(context_length=16)
    assert config.context_len == 16 and config.kind == "lm"
    config.check_run(SimpleNamespace(data=SimpleNamespace(seq_len=16)))
    config.check_run(SimpleNamespace(data=SimpleNamespace(seq_len=None)))
    with pytest.raises(ValueError, match=r"data\.seq_len: 17 is longer than model\.context_length 16"):
        config.check_run(SimpleNamespace(data=SimpleNamespace(seq_len=17)))


@pytest.mark.parametrize(
    ("ours", "theirs"), [("modern.yaml", "gpt.yaml"), ("modern_gpu.yaml", "gpt_gpu.yaml")]
)
def test_configs_match_gpts_size_and_context(ours, theirs):
    mine, gpt = (yaml.safe_load((CONFIGS / name).read_text()) for name in (ours, theirs))
    assert {k: v for k, v in mine.items() if k != "model"} == {k: v for k, v in gpt.items() if k != "model"}
    assert mine["model"]["context_length"] == gpt["model"]["context_length"]
    n_mine, n_gpt = (count_parameters(build_model(c["model"], 69)) for c in (mine, gpt))
    assert abs(n_mine / n_gpt - 1) < 0.05, (n_mine, n_gpt)


# ---- it learns ------------------------------------------------------------------------------------


def test_loss_falls_on_a_repeated_text():
    text = "the cat sat on the mat. " * 8
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) + 1 for c in text])  # id 0 is padding (ignored by the loss)
    torch.manual_seed(0)
    model = build_model(tiny_model_config("modern", d_model=32, n_heads=4, n_kv_heads=2), len(chars) + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    starts = torch.arange(0, len(data) - 17, 11)
    x = torch.stack([data[s : s + 16] for s in starts])
    y = torch.stack([data[s + 1 : s + 17] for s in starts])
    losses = []
    for _ in range(30):
        loss, _ = model(x, targets=y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 2.0  # about ln(12) at the start
    assert losses[-1] < 0.3 * losses[0], losses
