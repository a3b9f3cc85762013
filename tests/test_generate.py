"""Sampling: determinism, seeded reproducibility, the filters' math, stop strings, prompts, streaming."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_TEXT, generate, tiny_model_section
from hypothesis import given, settings
from hypothesis import strategies as st

from lmzoo.data.tokenizer import BpeTokenizerConfig, CharTokenizerConfig, WordTokenizerConfig, fit_tokenizer
from lmzoo.inference.decoding import decode, generate_ids
from lmzoo.inference.loaded import LoadedModel
from lmzoo.inference.sampling import (
    SamplingOptions,
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    next_token,
)
from lmzoo.inference.text import TextStream, start_ids
from lmzoo.models import build_model, list_models
from lmzoo.models.base import LanguageModel

LM_MODELS = [info.name for info in list_models() if info.kind == "lm"]
CYCLE = "abcdefgh\n"


class CycleModel(LanguageModel):
    """A fake LM that always predicts the character after the last one in CYCLE (a known text)."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.vocab = tokenizer.vocab_size
        order = tokenizer.encode(CYCLE)
        self.successor = {a: b for a, b in zip(order, order[1:] + order[:1], strict=True)}
        self.first = order[0]
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # generate_ids reads the device from a parameter
        self.calls: list[int] = []

    def forward(self, ids, state=None, targets=None):
        self.calls.append(ids.shape[1])
        logits = torch.full((ids.shape[0], ids.shape[1], self.vocab), -10.0)
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                logits[b, t, self.successor.get(int(ids[b, t]), self.first)] = 10.0
        return logits, (state or 0) + ids.shape[1]


@pytest.fixture(scope="module")
def char_tok():
    return fit_tokenizer(CharTokenizerConfig(), TINY_TEXT)


@pytest.fixture(scope="module")
def cycle_tok():
    return fit_tokenizer(CharTokenizerConfig(), CYCLE * 3)


@pytest.fixture(scope="module")
def word_tok():
    return fit_tokenizer(WordTokenizerConfig(), TINY_TEXT)


@pytest.fixture(scope="module")
def bpe_tok():
    return fit_tokenizer(BpeTokenizerConfig(vocab_size=300), TINY_TEXT)


def random_model(name: str, vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_model_section(name), vocab).eval()


def text_of(model, tokenizer, prompt, options, **kwargs) -> str:
    return "".join(generate(model, tokenizer, prompt, options, **kwargs))


def decoded(model, tokenizer, prompt, options, **kwargs) -> tuple[str, list[int]]:
    """(text, generated ids) through the one decoding loop."""
    steps = list(decode(LoadedModel(model, tokenizer), prompt, options, **kwargs))
    return "".join(step.text for step in steps), [step.id for step in steps]


def never_eos(model, tokenizer) -> None:
    """Make <eos> (which ends a generation) impossible for a random model with an output bias."""
    with torch.no_grad():
        model.head.proj.bias[tokenizer.eos_id] = -100.0


def spy_forward(model) -> list[list[int]]:
    """Record the ids (row 0) of every forward call: the prompt first, then each generated token fed back."""
    calls: list[list[int]] = []
    forward = model.forward

    def recording(ids, *args, **kwargs):
        calls.append(ids[0].tolist())
        return forward(ids, *args, **kwargs)

    model.forward = recording
    return calls


# ---- determinism ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LM_MODELS)
def test_greedy_ignores_the_sampling_seed_and_temperature_0_is_greedy(char_tok, name):
    """An untrained model is close to uniform: sampling gives another text for each seed, greedy never does."""
    model = random_model(name, char_tok.vocab_size)
    prompt = char_tok.encode("the ")

    def ids(seed: int, **options) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        chosen = SamplingOptions(max_new_tokens=25, **options)
        return list(generate_ids(model, prompt, chosen, generator=generator, banned_ids=[0, 1, 2]))

    greedy = ids(0, greedy=True, temperature=1.0)
    assert len(greedy) == 25
    assert ids(1, greedy=True, temperature=1.0) == greedy and ids(2, greedy=True, temperature=1.0) == greedy
    assert ids(3, temperature=0) == greedy  # temperature 0 is greedy too
    assert len({tuple(ids(seed, temperature=1.0)) for seed in range(3)}) == 3


@pytest.mark.parametrize("name", LM_MODELS)
def test_greedy_picks_the_argmax_of_a_full_forward(char_tok, name):
    model = random_model(name, char_tok.vocab_size)
    prompt = char_tok.encode("the cat")
    banned = [0, 1, 2]
    ids = list(
        generate_ids(model, prompt, SamplingOptions(max_new_tokens=12, greedy=True), banned_ids=banned)
    )
    context = list(prompt)
    with torch.no_grad():
        for token in ids:
            logits, _ = model(torch.tensor([context]))
            scores = logits[0, -1].clone()
            scores[banned] = float("-inf")
            assert token == int(scores.argmax())
            context.append(token)


@pytest.mark.parametrize("name", LM_MODELS)
def test_generation_runs_past_the_context_length(char_tok, name):
    model = random_model(name, char_tok.vocab_size)
    context = model.context_len or 32
    options = SamplingOptions(max_new_tokens=2 * context + 5, temperature=1.0)
    prompt = char_tok.encode("the cat sat on the mat. " * 3)
    ids = list(
        generate_ids(model, prompt, options, generator=torch.Generator().manual_seed(0), banned_ids=[0, 1, 2])
    )
    assert len(ids) == 2 * context + 5
    assert all(3 <= i < char_tok.vocab_size for i in ids)


def test_seeded_sampling_is_reproducible(char_tok):
    model = random_model("lstm", char_tok.vocab_size)
    options = SamplingOptions(max_new_tokens=40, temperature=1.5)

    def sample(seed: int) -> str:
        return text_of(model, char_tok, "a", options, generator=torch.Generator().manual_seed(seed))

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(5)}) > 1  # different seeds give different texts


def test_top_k_1_equals_greedy(char_tok):
    model = random_model("gru", char_tok.vocab_size)
    greedy = text_of(model, char_tok, "the", SamplingOptions(max_new_tokens=30, greedy=True))
    top1 = text_of(
        model,
        char_tok,
        "the",
        SamplingOptions(max_new_tokens=30, temperature=1.3, top_k=1),
        generator=torch.Generator().manual_seed(0),
    )
    assert top1 == greedy


def test_prompt_is_fed_once_then_one_token_at_a_time(cycle_tok):
    model = CycleModel(cycle_tok)
    list(generate_ids(model, cycle_tok.encode("abc"), SamplingOptions(max_new_tokens=4, greedy=True)))
    assert model.calls == [3, 1, 1, 1]  # the last token is never fed: nothing comes after it


# ---- the filters' math --------------------------------------------------------------------------


def test_filter_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([0.125, 0.5, 0.05, 0.25, 0.075])  # sorted: 0.5, 0.25, 0.125, 0.075, 0.05
    logits = probs.log()[None]
    kept = lambda p: set(torch.isfinite(filter_top_p(logits, p)[0]).nonzero().flatten().tolist())  # noqa: E731
    assert kept(0.3) == {1}  # 0.5 alone reaches 0.3
    assert kept(0.6) == {1, 3}  # 0.5 + 0.25 = 0.75 reaches 0.6
    assert kept(0.8) == {1, 3, 0}  # 0.875
    assert kept(0.9) == {1, 3, 0, 4}  # 0.95; the least likely token is still dropped
    assert kept(0.97) == {0, 1, 2, 3, 4}
    assert kept(1.0) == {0, 1, 2, 3, 4}
    # Kept scores are unchanged; the result renormalises to the kept mass.
    filtered = filter_top_p(logits, 0.6)
    assert torch.allclose(filtered[0, [1, 3]], logits[0, [1, 3]])
    assert torch.allclose(filtered.softmax(-1)[0, [1, 3]], torch.tensor([2 / 3, 1 / 3]))


def test_filter_top_p_works_row_by_row():
    logits = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]]).log()
    out = filter_top_p(logits, 0.8)
    assert torch.isfinite(out).tolist() == [[True, True, False], [False, True, True]]


def test_filter_top_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0], [0.0, -1.0, 2.0, 1.0]])
    out = filter_top_k(logits, 2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True], [False, False, True, True]]
    assert torch.equal(filter_top_k(logits, 10), logits)


def test_repetition_penalty_math():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 0.5, -0.5, 0.0]]))
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_repetition_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.0, -1.0]])
    seen = torch.tensor([[True, False, False]])
    plain = next_token(logits, SamplingOptions(greedy=True), seen=seen, generator=None)
    penalised = next_token(
        logits, SamplingOptions(greedy=True, repetition_penalty=2.0), seen=seen, generator=None
    )
    assert int(plain) == 0 and int(penalised) == 1  # 3 / 2 = 1.5 < 2


def test_temperature_sharpens_sampling():
    logits = torch.tensor([[1.0, 0.0]]).repeat(4000, 1)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    hot = next_token(logits, SamplingOptions(temperature=1.0), seen=seen, generator=gen).float().mean()
    cold = next_token(logits, SamplingOptions(temperature=0.25), seen=seen, generator=gen).float().mean()
    # P(token 1) = 1 / (1 + e) at T=1 and 1 / (1 + e^4) at T=0.25.
    assert abs(hot.item() - 1 / (1 + math.e)) < 0.03
    assert abs(cold.item() - 1 / (1 + math.e**4)) < 0.015


# ---- stop strings, prompts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        ((), "bcdefgh\nabcdefgh\nab"),
        (("de",), "bc"),
        (("fg", "cd"), "b"),  # the earliest stop wins
        (("\n",), "bcdefgh"),
        (("b",), ""),
        (("xyz",), "bcdefgh\nabcdefgh\nab"),
        (("h\na",), "bcdefg"),  # across tokens and lines
        (("abcdefgh\nabcdefgh\nabc",), "bcdefgh\nabcdefgh\nab"),  # a partial match at the end is released
    ],
)
def test_stop_strings_cut_the_output(cycle_tok, stop, expected):
    options = SamplingOptions(max_new_tokens=19, greedy=True, stop=stop)
    pieces = list(generate(CycleModel(cycle_tok), cycle_tok, "a", options))
    assert "".join(pieces) == expected
    assert all(pieces)  # no empty pieces are streamed


def test_unseen_prompt_characters_warn_once(char_tok):
    model = random_model("lstm", char_tok.vocab_size)
    warnings: list[str] = []
    text = text_of(
        model, char_tok, "the ZQZ cat", SamplingOptions(max_new_tokens=10, greedy=True), warn=warnings.append
    )
    assert len(warnings) == 1
    assert "2 piece(s)" in warnings[0] and "'Q'" in warnings[0] and "'Z'" in warnings[0]
    assert 0 < len(text) <= 10
    quiet: list[str] = []
    text_of(model, char_tok, "the cat", SamplingOptions(max_new_tokens=5, greedy=True), warn=quiet.append)
    assert quiet == []


def test_empty_prompt_starts_a_new_line(cycle_tok, char_tok):
    assert start_ids(cycle_tok) == cycle_tok.encode("\n")
    text = text_of(CycleModel(cycle_tok), cycle_tok, "", SamplingOptions(max_new_tokens=5, greedy=True))
    assert text == "abcde"  # what follows "\n" in the cycle
    # Real models start from the newline too, and generate every token asked for.
    model = random_model("rnn", char_tok.vocab_size)
    never_eos(model, char_tok)
    fed = spy_forward(model)
    out, ids = decoded(
        model, char_tok, "", SamplingOptions(max_new_tokens=8), generator=torch.Generator().manual_seed(0)
    )
    assert fed[0] == char_tok.encode("\n") and len(ids) == 8 and [f[0] for f in fed[1:]] == ids[:-1]
    assert out == char_tok.decode(ids)


def test_empty_prompt_without_a_newline_token_uses_bos():
    tok = fit_tokenizer(CharTokenizerConfig(), "abc abc")
    assert start_ids(tok) == [tok.bos_id]
    model = random_model("gru", tok.vocab_size)
    never_eos(model, tok)
    fed = spy_forward(model)
    text, generated = decoded(model, tok, "", SamplingOptions(max_new_tokens=6, greedy=True))
    assert fed[0] == [tok.bos_id] and len(generated) == 6
    assert text == tok.decode(generated) and text and set(text) <= set("abc ")


@pytest.mark.parametrize("options", [{"greedy": True}, {"temperature": 1.0}])
def test_special_ids_other_than_eos_are_never_generated(char_tok, options):
    """Through the public `generate`: its own ban list must keep <pad>, <unk> and <bos> out."""
    model = random_model("lstm", char_tok.vocab_size)
    with torch.no_grad():  # the specials overwhelmingly likely, <eos> never: only the ban stops them
        bias = model.head.proj.bias
        bias[char_tok.pad_id], bias[char_tok.unk_id], bias[char_tok.bos_id] = 100.0, 90.0, 80.0
        bias[char_tok.eos_id] = -100.0
    chosen = SamplingOptions(max_new_tokens=10, **options)
    text, generated = decoded(model, char_tok, "the", chosen, generator=torch.Generator().manual_seed(0))
    assert len(generated) == 10
    assert not {char_tok.pad_id, char_tok.unk_id, char_tok.bos_id} & set(generated)
    assert len(text) == 10 and "\ufffd" not in text and text == char_tok.decode(generated)


def test_generate_needs_a_prompt_token(char_tok):
    with pytest.raises(ValueError, match="at least one prompt token"):
        list(generate_ids(random_model("lstm", char_tok.vocab_size), [], SamplingOptions()))


# ---- streaming ------------------------------------------------------------------------------------------


def stream_text(tokenizer, ids, context=()) -> str:
    stream = TextStream(tokenizer, context=context)
    return "".join(stream.push(i) for i in ids) + stream.flush()


@pytest.mark.parametrize(
    "text",
    [
        "the cat sat on the mat.\nthe dog ate the bone.\n",
        "a bird\n\nsang   in the tree",
        "unknown zebra words, the cat",
    ],
)
def test_text_stream_reproduces_word_decode(word_tok, text):
    ids = word_tok.encode(text)
    assert stream_text(word_tok, ids) == word_tok.decode(ids)
    context, rest = ids[:3], ids[3:]
    assert word_tok.decode(context) + stream_text(word_tok, rest, context) == word_tok.decode(ids)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=60), cut=st.integers(min_value=0, max_value=60))
def test_text_stream_reproduces_bpe_decode(bpe_tok, text, cut):
    ids = bpe_tok.encode(text)
    assert stream_text(bpe_tok, ids) == text
    cut = min(cut, len(ids))
    prompt = bpe_tok.decode(ids[:cut])
    if bpe_tok.encode(prompt) == ids[:cut]:  # a prompt is always whole text
        assert prompt + stream_text(bpe_tok, ids[cut:], ids[:cut]) == text


def test_text_stream_holds_back_partial_characters(bpe_tok):
    ids = bpe_tok.encode("日本")
    assert len(ids) > 2  # byte-level pieces of multi-byte characters
    stream = TextStream(bpe_tok)
    pieces = [stream.push(i) for i in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + stream.flush() == "日本"


def test_generated_word_text_has_word_spacing(word_tok):
    model = random_model("lstm", word_tok.vocab_size)
    ids = list(
        generate_ids(
            model,
            word_tok.encode("the cat"),
            SamplingOptions(max_new_tokens=15, greedy=True),
            banned_ids=[0, 1, 2],
        )
    )
    text = text_of(model, word_tok, "the cat", SamplingOptions(max_new_tokens=15, greedy=True))
    full = word_tok.decode(word_tok.encode("the cat") + ids)
    assert "the cat" + text == full
