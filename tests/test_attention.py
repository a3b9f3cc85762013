"""Multi-head attention and the GPT built on it: masks, the two attention paths, torch's reference
layer, sinusoidal positions, KV-cache decoding (also past the context length) and config checks."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model_section

from lmzoo.errors import ConfigError
from lmzoo.inference.decoding import generate_ids
from lmzoo.inference.sampling import SamplingOptions
from lmzoo.models import attention, build_model
from lmzoo.models.attention import KVCache, MultiHeadAttention, sinusoidal_positions
from lmzoo.models.gpt import GPT

VOCAB = 23
ATTENTION_PATHS = ["sdpa", "explicit"]


def tiny_gpt(seed: int = 0, **extra) -> GPT:
    torch.manual_seed(seed)
    return build_model(tiny_model_section("gpt", **extra), VOCAB).eval()


# ---- the causal mask ------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ATTENTION_PATHS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_changing_later_tokens_leaves_earlier_logits_bit_identical(attention, seed):
    model = tiny_gpt(seed, attention=attention)
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
            # The later positions do depend on the changed tokens (the test would catch a leak).
            assert not torch.allclose(other[:, t + 1 :], logits[:, t + 1 :])


# ---- the fused path against the formula -----------------------------------------------------------


def attention_pair(
    d_model: int = 16, heads: int = 4, seed: int = 0
) -> tuple[MultiHeadAttention, MultiHeadAttention]:
    """The same weights behind the SDPA path and the explicit path."""
    torch.manual_seed(seed)
    fused = MultiHeadAttention(d_model, heads).eval()
    explicit = MultiHeadAttention(d_model, heads, explicit=True).eval()
    explicit.load_state_dict(fused.state_dict())
    return fused, explicit


def right_padding(lengths: list[int], steps: int) -> torch.Tensor:
    """(B, S) bool, True at padding: each row's first `length` keys are real."""
    return torch.arange(steps)[None, :] >= torch.tensor(lengths)[:, None]


@pytest.mark.parametrize(
    ("causal", "padded"),
    [(True, False), (False, True), (True, True), (False, False)],
    ids=["causal", "padding", "causal+padding", "none"],
)
def test_sdpa_path_equals_explicit_path(causal, padded):
    fused, explicit = attention_pair()
    x = torch.randn(3, 9, 16)
    mask = right_padding([9, 4, 1], 9) if padded else None
    with torch.no_grad():
        expected = explicit(x, causal=causal, key_padding_mask=mask)
        got = fused(x, causal=causal, key_padding_mask=mask)
    assert got.shape == (3, 9, 16)
    assert torch.isfinite(expected).all()
    assert torch.allclose(got, expected, atol=1e-5)


def test_sdpa_path_equals_explicit_path_for_cross_attention_and_with_a_cache():
    fused, explicit = attention_pair(seed=1)
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    mask = right_padding([7, 3], 7)
    with torch.no_grad():
        assert torch.allclose(
            fused(x, memory, key_padding_mask=mask), explicit(x, memory, key_padding_mask=mask), atol=1e-5
        )
        # Several queries appended to a cache: the causal mask is offset by the cached length.
        outputs = []
        for layer in (fused, explicit):
            cache = KVCache(2, 4, 10, 4, like=x)
            layer(x[:, :2], causal=True, cache=cache)
            outputs.append(layer(x[:, 2:], causal=True, cache=cache))
            assert cache.length == 5
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    with torch.no_grad():
        full = explicit(x, causal=True)
    assert torch.allclose(outputs[1], full[:, 2:], atol=1e-5)


def test_gpt_logits_are_the_same_on_both_attention_paths():
    fused = tiny_gpt(6, attention="sdpa")
    explicit = tiny_gpt(99, attention="explicit")
    explicit.load_state_dict(fused.state_dict())
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.allclose(fused(ids)[0], explicit(ids)[0], atol=1e-5)


# ---- against torch.nn.MultiheadAttention ----------------------------------------------------------


def reference_of(ours: MultiHeadAttention) -> torch.nn.MultiheadAttention:
    """torch's layer holding our weights: in_proj stacks W_Q, W_K, W_V exactly like in_proj_weight."""
    ref = torch.nn.MultiheadAttention(ours.d_model, ours.n_heads, dropout=0.0, bias=True, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.in_proj.weight)
        ref.in_proj_bias.copy_(ours.in_proj.bias)
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    return ref  # left in training mode (dropout 0): torch's fast path would zero padded query rows


def allowed(steps: int, keys: int, causal: bool, padding: torch.Tensor | None, batch: int) -> torch.Tensor:
    """(B, T, S) True where query t may attend to key s."""
    ok = torch.ones(batch, steps, keys, dtype=torch.bool)
    if causal:
        ok &= torch.ones(steps, keys, dtype=torch.bool).tril()[None]
    if padding is not None:
        ok &= ~padding[:, None, :]
    return ok


@pytest.mark.parametrize("explicit", [False, True], ids=["sdpa", "explicit"])
@pytest.mark.parametrize(
    ("causal", "padding"),
    [(False, None), (True, None), (False, "right"), (True, "right"), (True, "left")],
)
def test_self_attention_equals_torch_multihead_attention(explicit, causal, padding):
    torch.manual_seed(3)
    ours = MultiHeadAttention(12, 3, explicit=explicit)
    ref = reference_of(ours)
    batch, steps = 3, 8
    x = torch.randn(batch, steps, 12)
    mask = None
    if padding == "right":
        mask = right_padding([8, 5, 2], steps)
    elif padding == "left":  # with the causal mask, the first queries of rows 1 and 2 see no key at all
        mask = ~right_padding([8, 5, 2], steps).flip(1)
    attn_mask = (
        torch.ones(steps, steps, dtype=torch.bool).triu(1) if causal else None
    )  # torch: True = blocked
    with torch.no_grad():
        got = ours(x, causal=causal, key_padding_mask=mask)
        expected, _ = ref(x, x, x, key_padding_mask=mask, attn_mask=attn_mask, need_weights=False)
    rows = allowed(steps, steps, causal, mask, batch).any(-1)  # (B, T): queries that see at least one key
    if padding == "left":
        assert not rows.all()  # the case really has fully masked rows
    assert torch.isfinite(got[rows]).all()
    assert torch.allclose(got[rows], expected[rows], atol=1e-5)


@pytest.mark.parametrize("explicit", [False, True], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("padded", [False, True])
def test_cross_attention_equals_torch_multihead_attention(explicit, padded):
    torch.manual_seed(4)
    ours = MultiHeadAttention(16, 2, explicit=explicit)
    ref = reference_of(ours)
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    mask = right_padding([9, 4], 9) if padded else None
    with torch.no_grad():
        got = ours(x, memory, key_padding_mask=mask)
        projected = ours(
            x, ours.project_kv(memory), key_padding_mask=mask
        )  # K/V computed once, as decoding does
        expected, _ = ref(x, memory, memory, key_padding_mask=mask, need_weights=False)
    assert got.shape == (2, 5, 16)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(projected, got)


def test_padded_keys_get_no_attention_weight():
    """Changing the values at padded memory positions leaves the output unchanged."""
    torch.manual_seed(5)
    ours = MultiHeadAttention(8, 2).eval()
    x, memory = torch.randn(2, 3, 8), torch.randn(2, 6, 8)
    mask = right_padding([6, 2], 6)
    noisy = memory.clone()
    noisy[1, 2:] = torch.randn(4, 8) * 100
    with torch.no_grad():
        assert torch.allclose(
            ours(x, memory, key_padding_mask=mask), ours(x, noisy, key_padding_mask=mask), atol=1e-6
        )
        assert not torch.allclose(ours(x, memory), ours(x, noisy))


# ---- sinusoidal positions -------------------------------------------------------------------------


@pytest.mark.parametrize(("length", "d_model"), [(1, 2), (9, 8), (50, 6), (5, 7)])
def test_sinusoidal_positions_match_the_formula(length, d_model):
    table = sinusoidal_positions(length, d_model)
    assert table.shape == (length, d_model) and table.dtype == torch.float32
    expected = torch.zeros(length, d_model, dtype=torch.float64)
    for pos in range(length):
        for j in range(d_model):
            i = j // 2
            angle = pos / 10000 ** (2 * i / d_model)
            expected[pos, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    assert torch.allclose(table.double(), expected, atol=1e-5)
    assert torch.equal(table[0, 0::2], torch.zeros((d_model + 1) // 2))
    assert torch.equal(table[0, 1::2], torch.ones(d_model // 2))


# ---- KV-cache decoding, within and past the context -----------------------------------------------


@pytest.mark.parametrize("attention", ATTENTION_PATHS)
@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_cached_decoding_equals_full_forward_past_the_context(attention, positions):
    context = 8
    model = tiny_gpt(7, attention=attention, positions=positions, context_length=context)
    generator = torch.Generator().manual_seed(8)
    history = torch.randint(0, VOCAB, (2, 23), generator=generator)
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
            # The cache holds the last tokens of the history, never more than the context.
            assert 1 <= window.shape[1] <= context
            assert torch.equal(window, history[:, t + 1 - window.shape[1] : t + 1])
            assert all(cache.length == window.shape[1] for cache in state.caches)
            slid |= window.shape[1] < t + 1
            reference, _ = model(window)  # a fresh full forward over exactly the tokens the cache holds
            assert torch.allclose(step[:, 0], reference[:, -1], atol=1e-5), f"step {t}"
            if t + 1 <= context:  # before sliding: the same as a forward over the whole history
                whole, _ = model(history[:, : t + 1])
                assert torch.allclose(step[:, 0], whole[:, -1], atol=1e-5)
    assert slid, "the window never slid: the test did not go past the context"


def test_a_chunk_that_crosses_the_context_is_decoded_over_the_kept_window():
    context = 8
    model = tiny_gpt(9, context_length=context)
    ids = torch.randint(0, VOCAB, (1, 14), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        _, state = model(ids[:, :6], model.init_state(1))
        chunk, state = model(ids[:, 6:10], state)  # 6 + 4 > 8: the window slides during a chunk
        assert chunk.shape == (1, 4, VOCAB)
        kept = state.ids
        assert torch.equal(kept, ids[:, 10 - kept.shape[1] : 10])
        reference, _ = model(kept)
    assert torch.allclose(chunk, reference[:, -4:], atol=1e-5)


def test_a_prompt_longer_than_the_context_is_cropped():
    context = 8
    model = tiny_gpt(11, context_length=context)
    prompt = torch.randint(1, VOCAB, (30,), generator=torch.Generator().manual_seed(12)).tolist()
    options = SamplingOptions(max_new_tokens=12, greedy=True)
    out = list(generate_ids(model, prompt, options))
    assert len(out) == 12 and all(0 <= token < VOCAB for token in out)
    # Only the prompt's last `context` tokens matter.
    assert out == list(generate_ids(model, prompt[-context:], options))
    with torch.no_grad():
        first, _ = model(torch.tensor([prompt[-context:]]))
    assert out[0] == int(first[0, -1].argmax())
    # The model itself never crops silently: more tokens than the context is an error, with or without a
    # decoding state (a sliding window would return logits for fewer positions than it was given).
    for state in (None, model.init_state(1)):
        with pytest.raises(ValueError, match="longer than the context length"):
            model(torch.tensor([prompt]), state)
    _, state = model(torch.tensor([prompt[:3]]), model.init_state(1))
    with pytest.raises(ValueError, match="longer than the context length"):
        model(torch.tensor([prompt[3 : 3 + context + 1]]), state)


# ---- configuration checks -------------------------------------------------------------------------


def test_seq_len_longer_than_the_context_is_a_config_error(make_config):
    with pytest.raises(ConfigError, match=r"data\.seq_len") as err:
        make_config({"model": tiny_model_section("gpt", context_length=16), "data": {"seq_len": 17}})
    assert "\n" not in str(err.value) and "context_length" in str(err.value)
    assert (
        make_config({"model": tiny_model_section("gpt", context_length=16), "data": {"seq_len": 16}}).seq_len
        == 16
    )


@pytest.mark.parametrize("name", ["gpt", "transformer"])
def test_heads_not_dividing_the_width_is_a_config_error(make_config, name):
    with pytest.raises(ConfigError, match=r"model\.n_heads") as err:
        build_model(tiny_model_section(name, d_model=16, n_heads=3), VOCAB)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"model\.n_heads: n_heads \(3\) must divide d_model \(16\)"):
        make_config({"model": tiny_model_section(name, d_model=16, n_heads=3)})
    with pytest.raises(ValueError, match="not divisible"):
        MultiHeadAttention(16, 3)


# ---- which fused kernels CUDA may use ------------------------------------------------------------


def test_cuda_attention_leaves_out_cudnn_and_restores_the_flags(monkeypatch) -> None:
    flags = torch.backends.cuda
    assert flags.cudnn_sdp_enabled()
    with attention.attention_backends(torch.device("cuda")):
        assert not flags.cudnn_sdp_enabled()  # cuDNN plans every new shape: slow for changing shapes
        assert flags.flash_sdp_enabled() and flags.mem_efficient_sdp_enabled() and flags.math_sdp_enabled()
    assert flags.cudnn_sdp_enabled()
    with attention.attention_backends(torch.device("cpu")):
        assert flags.cudnn_sdp_enabled()
    monkeypatch.setattr(attention, "CUDA_CUDNN_ATTENTION", True)
    with attention.attention_backends(torch.device("cuda")):
        assert flags.cudnn_sdp_enabled()


def test_fused_attention_runs_under_the_chosen_backends(monkeypatch) -> None:
    seen: list[torch.device] = []
    real = attention.attention_backends
    monkeypatch.setattr(attention, "attention_backends", lambda device: seen.append(device) or real(device))
    q = torch.randn(1, 2, 3, 4)
    out = attention.fused_attention(q, q, q, is_causal=True)
    assert seen == [q.device]
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))
