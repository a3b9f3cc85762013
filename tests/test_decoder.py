"""The decoder shell shared by gpt and modern (lmzoo.models.decoder): the static KV cache gives the dynamic
cache's greedy tokens, also past the context and compiled; both attention paths give the same logits; the
parameter names that saved checkpoints depend on stay put."""

from __future__ import annotations

import pytest
import torch

from lmzoo.inference.decoding import SamplingOptions, generate_ids
from lmzoo.models import build_model, tiny_model_config
from lmzoo.models.attention import KVCache, StaticKVCache

torch.set_num_threads(1)

VOCAB = 30
DECODERS = ["gpt", "modern"]
# Variants whose attention differs: GPT's sinusoidal positions and post-LN; modern's GQA, MHA and QK-norm.
VARIANTS = [
    ("gpt", {}),
    ("gpt", {"positions": "sinusoidal", "norm": "post"}),
    ("modern", {}),
    ("modern", {"n_kv_heads": 2, "qk_norm": True}),
]


def lively(name: str, seed: int = 3, **extra) -> torch.nn.Module:
    """A tiny fp32 decoder, dropout 0, whose greedy text does not settle on a few tokens (an untied output
    layer; seed 3 gives every variant below more than 3 distinct greedy tokens)."""
    torch.manual_seed(seed)
    config = tiny_model_config(name, tie_weights=False, dropout=0.0, **extra)
    return build_model(config, VOCAB).eval()


def greedy(model: torch.nn.Module, prompt: list[int], state, steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens fed back one at a time with `state`, and the scores (steps, V) they came from."""
    tokens, scores = [], []
    device = next(model.parameters()).device
    with torch.no_grad():
        logits, state = model(torch.tensor([prompt], device=device), state)
        for _ in range(steps):
            scores.append(logits[0, -1].cpu())
            tokens.append(int(logits[0, -1].argmax()))
            logits, state = model(torch.tensor([[tokens[-1]]], device=device), state)
    return tokens, torch.stack(scores)


# ---- the static KV cache -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "extra"), VARIANTS, ids=str)
@pytest.mark.parametrize("prompt_len", [1, 7, 32])
def test_static_cache_gives_the_dynamic_caches_tokens_past_the_context(name, extra, prompt_len):
    model = lively(name, **extra)
    context = model.config.context_length
    prompt = [3 + i % 20 for i in range(prompt_len)]
    steps = 3 * context  # the window slides several times
    dynamic, dynamic_scores = greedy(model, prompt, model.init_state(1), steps)
    state = model.static_state(1, compile=False)
    assert state is not None, f"{name} has no static decoding state"
    static, static_scores = greedy(model, prompt, state, steps)
    assert static == dynamic and len(set(dynamic)) > 3
    torch.testing.assert_close(static_scores, dynamic_scores, rtol=0, atol=1e-5)
    # ... generate_ids asked for the static cache gives them too.
    options = SamplingOptions(max_new_tokens=steps, greedy=True)
    assert list(generate_ids(model, prompt, options, cache="static")) == dynamic


@pytest.mark.parametrize(("name", "extra"), VARIANTS, ids=str)
def test_a_static_state_holds_fixed_shape_caches_of_the_kv_heads(name, extra):
    model = lively(name, **extra)
    kv_heads, context = model.config.kv_heads, model.config.context_length
    with torch.no_grad():
        _, state = model(torch.tensor([[3, 4, 5]]), model.static_state(1))
        buffers = [cache.k for cache in state.caches]
        assert all(isinstance(cache, StaticKVCache) for cache in state.caches)
        assert all(k.shape == (1, kv_heads, context, model.config.head_dim) for k in buffers)
        assert int(state.position) == 3 and all(cache.position is state.position for cache in state.caches)
        for token in range(context):  # past the context: the window slides into the same buffers
            _, state = model(torch.tensor([[token % VOCAB]]), state)
        assert [cache.k for cache in state.caches] == buffers and int(state.position) == state.length
    _, dynamic = model(torch.tensor([[3, 4, 5]]), model.init_state(1))
    assert all(type(cache) is KVCache and cache.k.shape[1] == kv_heads for cache in dynamic.caches)


ON_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


# torch.compile on the CPU takes about 30 s for the first model of a process; on CUDA it is a CUDA graph.
@pytest.mark.parametrize(
    "device", [pytest.param("cpu", marks=pytest.mark.slow), pytest.param("cuda", marks=ON_CUDA)]
)
@pytest.mark.parametrize("name", DECODERS)
def test_compiled_static_decoding_gives_the_dynamic_caches_tokens(name, device):
    model = lively(name, context_length=8).to(device)
    prompt, steps = [3, 4, 5], 12  # past the 8-token context: the compiled step after a slide too
    dynamic, dynamic_scores = greedy(model, prompt, model.init_state(1), steps)
    compiled, compiled_scores = greedy(model, prompt, model.static_state(1, compile=True), steps)
    assert compiled == dynamic
    atol = 1e-4 if device == "cpu" else 1e-3  # other kernels, fused differently
    torch.testing.assert_close(compiled_scores, dynamic_scores, rtol=0, atol=atol)


# ---- both attention paths ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "extra"), VARIANTS, ids=str)
def test_explicit_attention_gives_the_sdpa_logits(name, extra):
    fused = lively(name, 1, attention="sdpa", **extra)
    explicit = lively(name, 2, attention="explicit", **extra)
    explicit.load_state_dict(fused.state_dict())
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(explicit(ids)[0], fused(ids)[0], rtol=0, atol=1e-5)
    # ... and decoding with the static cache, whose mask covers the whole capacity, past the context.
    prompt = ids[0, :5].tolist()
    paths = [greedy(model, prompt, model.static_state(1), 40) for model in (fused, explicit)]
    assert paths[0][0] == paths[1][0]
    torch.testing.assert_close(paths[1][1], paths[0][1], rtol=0, atol=1e-5)


# ---- parameter names: saved checkpoints load by them ---------------------------------------------

GPT_BLOCK = [
    "norm1.weight",
    "norm1.bias",
    "attn.in_proj.weight",
    "attn.in_proj.bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "norm2.weight",
    "norm2.bias",
    "ff.up.weight",
    "ff.up.bias",
    "ff.down.weight",
    "ff.down.bias",
]
MODERN_BLOCK = [
    "attn_norm.weight",
    "attn.q_proj.weight",
    "attn.k_proj.weight",
    "attn.v_proj.weight",
    "attn.o_proj.weight",
    "ff_norm.weight",
    "ff.gate.weight",
    "ff.up.weight",
    "ff.down.weight",
]
STATE_KEYS = {
    "gpt": (
        ["token_embedding.weight", "position_embedding.weight", "final_norm.weight", "final_norm.bias"],
        GPT_BLOCK,
    ),
    "modern": (["token_embedding.weight", "final_norm.weight"], MODERN_BLOCK),
}


@pytest.mark.parametrize("name", DECODERS)
def test_state_dict_keys_of_the_tiny_configs_are_pinned(name):
    model = build_model(tiny_model_config(name), VOCAB)
    top, block = STATE_KEYS[name]
    layers = model.config.n_layers
    expected = {*top, "head.proj.weight", *(f"blocks.{i}.{key}" for i in range(layers) for key in block)}
    assert set(model.state_dict()) == expected


def test_state_dict_keys_of_the_optional_parts_are_pinned():
    qk = build_model(tiny_model_config("modern", qk_norm=True), VOCAB).state_dict()
    assert {key for key in qk if "q_norm" in key or "k_norm" in key} == {
        f"blocks.{i}.attn.{norm}.weight" for i in range(2) for norm in ("q_norm", "k_norm")
    }
    sinusoidal = build_model(tiny_model_config("gpt", positions="sinusoidal"), VOCAB)
    assert "position_embedding.weight" not in sinusoidal.state_dict()  # the table is a fixed buffer
    assert "position_table" in dict(sinusoidal.named_buffers())
