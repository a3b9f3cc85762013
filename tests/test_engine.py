"""The batched decoding engine (lmzoo.inference.engine): every family's batched rows give each request
the tokens it gets decoded alone; requests join mid-flight and leave at their own lengths; cancellation
and errors end one sequence at the next step; the queue is bounded."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import TINY_TEXT, tiny_model_section

from lmzoo.data.tokenizer import CharTokenizerConfig, fit_tokenizer
from lmzoo.inference.decoding import decode
from lmzoo.inference.engine import Engine, EngineBusy, Request
from lmzoo.inference.loaded import LoadedModel
from lmzoo.inference.sampling import SamplingOptions
from lmzoo.models import build_model

# Variants whose batched rows differ: positions (learned, sinusoidal, rotary), GQA, cells, attention.
LM_VARIANTS = [
    ("gpt", {}),
    ("gpt", {"positions": "sinusoidal", "norm": "post"}),
    ("modern", {}),
    ("modern", {"n_kv_heads": 2, "qk_norm": True}),
    ("lstm", {}),
    ("gru", {}),
    ("rnn", {}),
]
SEQ2SEQ_VARIANTS = [("seq2seq", {}), ("seq2seq", {"cell": "gru", "decoder_layers": 2}), ("transformer", {})]
# Mixed lengths; the longest with its 40 new tokens runs past a tiny decoder's 32-token context.
PROMPTS = ["the cat", "a", "the dog ate the bone. a bird", "sang in the tree.\n", "the mat", "bird "]
LENGTHS = [40, 7, 25, 12, 33, 18]  # each request its own max_new_tokens: they leave at different steps


@pytest.fixture(scope="module")
def tokenizer():
    return fit_tokenizer(CharTokenizerConfig(), TINY_TEXT)


def loaded(name: str, extra: dict, tokenizer, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    model = build_model(tiny_model_section(name, **extra), tokenizer.vocab_size).eval()
    with torch.no_grad():  # sharper than at initialisation, so that greedy output depends on the prompt
        for parameter in model.parameters():
            parameter.mul_(3.0)
    if model.kind == "seq2seq":
        return LoadedModel(model, tokenizer, tokenizer, max_target_len=30)
    return LoadedModel(model, tokenizer)


def one_at_a_time(lm: LoadedModel, prompt, options: SamplingOptions, seed: int | None = None) -> list[int]:
    return [step.id for step in decode(lm, prompt, options, seed=seed)]


def ids_of(generation) -> list[int]:
    return [step.id for step in generation.steps]


@pytest.mark.parametrize(("name", "extra"), LM_VARIANTS + SEQ2SEQ_VARIANTS)
def test_batched_greedy_equals_one_at_a_time(tokenizer, name, extra):
    """Three slots for six requests: three wait in the queue and join as others leave; every request's
    tokens are the ones it gets decoded alone (decoder LMs: also past the context, where a row slides)."""
    lm = loaded(name, extra, tokenizer)
    options = [SamplingOptions(max_new_tokens=n, greedy=True, ignore_eos=True) for n in LENGTHS]
    expected = [one_at_a_time(lm, p, o) for p, o in zip(PROMPTS, options, strict=True)]
    engine = Engine(lm, slots=3)
    done = engine.generate(PROMPTS, options)
    assert [ids_of(g) for g in done] == expected
    assert [g.finish_reason for g in done] == ["length"] * len(PROMPTS)
    if lm.kind == "lm":  # seq2seq output is cut at the run's max_len (30)
        assert [g.completion_tokens for g in done] == LENGTHS
    assert len({tuple(e[:5]) for e in expected}) > 1  # the prompts do steer the model
    assert engine.active == 0 and engine.queued == 0


@pytest.mark.parametrize("name", ["gpt", "lstm", "transformer"])
def test_sampled_rows_keep_their_own_seeded_rng(tokenizer, name):
    lm = loaded(name, {}, tokenizer)
    options = SamplingOptions(max_new_tokens=15, temperature=1.0, top_k=20, ignore_eos=True)
    seeds = [11, 12, 13, 14]
    expected = [one_at_a_time(lm, PROMPTS[i], options, seed=s) for i, s in enumerate(seeds)]
    done = Engine(lm, slots=4).generate(PROMPTS[:4], options, seeds=seeds)
    assert [ids_of(g) for g in done] == expected and len({tuple(e) for e in expected}) == 4


def test_requests_joining_mid_flight_decode_as_alone(tokenizer):
    """A request submitted while others are half-way through gets the tokens it gets alone."""
    lm = loaded("modern", {}, tokenizer)
    options = SamplingOptions(max_new_tokens=30, greedy=True, ignore_eos=True)
    engine = Engine(lm, slots=8)
    first = engine.submit_all([Request(p, options) for p in PROMPTS[:3]])
    for _ in range(11):
        engine.step()
    assert engine.active == 3 and not any(g.done for g in first)
    late = engine.submit_all([Request(p, options) for p in PROMPTS[3:]])
    engine.run()
    for generation, prompt in zip(first + late, PROMPTS, strict=True):
        assert ids_of(generation) == one_at_a_time(lm, prompt, options)


def test_stop_strings_and_eos_end_one_row_and_free_it(tokenizer):
    lm = loaded("gpt", {}, tokenizer)
    free = SamplingOptions(max_new_tokens=20, greedy=True, ignore_eos=True)
    text = "".join(step.text for step in decode(lm, "the cat", free))
    stop = text[5:7]
    cut = SamplingOptions(max_new_tokens=20, greedy=True, ignore_eos=True, stop=(stop,))
    engine = Engine(lm, slots=2)
    stopped, other = engine.generate(["the cat", "the dog"], [cut, free])
    assert stopped.text == text[: text.index(stop)] and stopped.finish_reason == "stop"
    assert other.finish_reason == "length" and other.completion_tokens == 20


def test_a_cancelled_request_frees_its_slot_at_the_next_step(tokenizer):
    lm = loaded("lstm", {}, tokenizer)
    options = SamplingOptions(max_new_tokens=10_000, greedy=True, ignore_eos=True)
    engine = Engine(lm, slots=2)
    doomed, kept = engine.submit_all([Request("the", options), Request("a", options)])
    waiting = engine.submit(Request("the dog", SamplingOptions(max_new_tokens=5, greedy=True)))
    for _ in range(3):
        engine.step()
    assert engine.active == 2 and engine.queued == 1
    doomed.cancel()
    steps = engine.steps
    engine.step()  # the cancelled row leaves, the waiting request takes its slot in the same step
    assert engine.steps == steps + 1 and doomed.done and doomed.finish_reason == "cancelled"
    assert engine.active == 2 and engine.queued == 0 and not kept.done
    kept.cancel()
    engine.run()
    assert waiting.result().completion_tokens <= 5 and engine.active == 0


def test_a_check_that_raises_ends_only_its_sequence(tokenizer):
    lm = loaded("gpt", {}, tokenizer)
    options = SamplingOptions(max_new_tokens=8, greedy=True, ignore_eos=True)
    calls = []

    def timeout() -> None:
        calls.append(1)
        if len(calls) > 3:
            raise TimeoutError("too slow")

    engine = Engine(lm, slots=4)
    bad, good = engine.submit_all([Request("the", options, check=timeout), Request("the", options)])
    engine.run()
    with pytest.raises(TimeoutError):
        bad.result()
    assert good.result().completion_tokens == 8 and ids_of(good) == one_at_a_time(lm, "the", options)


def test_token_id_prompts_and_an_unreadable_prompt(tokenizer):
    lm = loaded("gpt", {}, tokenizer)
    options = SamplingOptions(max_new_tokens=6, greedy=True, ignore_eos=True)
    ids = tokenizer.encode("the cat")
    engine = Engine(lm, slots=2)
    empty, given = engine.submit_all([Request([], options), Request(ids, options)])
    engine.run()
    with pytest.raises(ValueError):
        empty.result()
    assert ids_of(given) == one_at_a_time(lm, "the cat", options) and given.prompt_tokens == len(ids)


def test_the_queue_is_bounded(tokenizer):
    lm = loaded("lstm", {}, tokenizer)
    options = SamplingOptions(max_new_tokens=3, greedy=True)
    engine = Engine(lm, slots=2, max_queue=1)
    engine.submit_all([Request("a", options)] * 3)  # two slots and one waiting
    with pytest.raises(EngineBusy):
        engine.submit(Request("a", options))
    engine.run()
    assert len(engine.submit_all([Request("a", options)] * 3)) == 3


def test_a_sequence_is_out_of_its_row_before_its_caller_hears_it_ended(tokenizer):
    """A client that gets its answer and sends the next request at once must find the slot free."""
    lm = loaded("lstm", {}, tokenizer)
    engine = Engine(lm, slots=1, max_queue=0)
    seen: list[tuple[int, int]] = []
    for prompt, options in [
        ("a", SamplingOptions(max_new_tokens=2, greedy=True, ignore_eos=True)),  # ends at its length
        ("a", SamplingOptions(max_new_tokens=10_000, greedy=True, ignore_eos=True)),  # cancelled
        ([], SamplingOptions(max_new_tokens=2, greedy=True)),  # fails while taken into its row
    ]:
        generation = engine.submit(Request(prompt, options))
        generation.future.add_done_callback(lambda _: seen.append((engine.active, engine.queued)))
        engine.step()
        generation.cancel()
        engine.run()
        assert generation.done
    assert seen == [(0, 0)] * 3


def test_a_background_engine_steps_in_its_own_thread(tokenizer):
    lm = loaded("gpt", {}, tokenizer)
    options = SamplingOptions(max_new_tokens=12, greedy=True, ignore_eos=True)
    engine = Engine(lm, slots=4, background=True)
    seen: list[str] = []
    streamed = threading.Event()
    request = Request("the", options, on_step=lambda step: (seen.append(step.text), streamed.set()))
    generation = engine.submit(request)
    assert generation.result(timeout=30).completion_tokens == 12
    assert streamed.is_set() and "".join(seen) == generation.text
    assert engine.generate(["the"], options)[0].text == generation.text


def test_a_family_without_batched_rows_decodes_row_by_row(tokenizer):
    """The model contract's default rows (a family defining only hidden/init_state: tests/toy_family.py)
    step one sequence after another, with the same tokens."""
    import toy_family

    toy_family.register()
    try:
        lm = loaded(toy_family.NAME, {}, tokenizer)
        options = [SamplingOptions(max_new_tokens=n, greedy=True, ignore_eos=True) for n in LENGTHS]
        expected = [one_at_a_time(lm, p, o) for p, o in zip(PROMPTS, options, strict=True)]
        assert [ids_of(g) for g in Engine(lm, slots=3).generate(PROMPTS, options)] == expected
    finally:
        toy_family.unregister()
