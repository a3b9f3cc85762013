"""The one scorer's rule: every token after the first is scored once, given the tokens before it; windows
follow one another overlapping by one token (attention models), a state-carrying model carries its state
through the text; batching changes how fast the numbers come, not which numbers."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model_section

from lmzoo.data.tokenizer import CharTokenizer
from lmzoo.inference.loaded import LoadedModel
from lmzoo.inference.scoring import COLUMN_WINDOWS, evaluate_stream, read_sequences, score_sequences
from lmzoo.models import build_model

VOCAB = 20


def model_of(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(tiny_model_section(name), VOCAB).eval()


def loaded(model: torch.nn.Module, *, window: int, batch_size: int) -> LoadedModel:
    return LoadedModel(model, CharTokenizer.fit("abc"), window=window, batch_size=batch_size)


@pytest.mark.parametrize("name", ["gpt", "lstm"])
def test_every_target_is_scored_once_in_order(name):
    ids = torch.randint(4, VOCAB, (103,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        batches = list(read_sequences(loaded(model_of(name), window=10, batch_size=3), [ids, ids[:7]]))
    sequence = torch.cat([b.sequence for b in batches])
    position = torch.cat([b.position for b in batches])
    for index, length in ((0, 103), (1, 7)):
        mine = position[sequence == index]
        assert sorted(mine.tolist()) == list(range(1, length))
    targets = torch.cat([b.target for b in batches])
    assert torch.equal(targets[sequence == 0].sort().values, ids[1:].sort().values)


def test_a_window_starts_from_the_previous_windows_last_token():
    """A GPT reads windows of `window` inputs that overlap by one token: the first target of a window is
    predicted from that token alone; every other target from the window's tokens before it."""
    model = model_of("gpt")
    ids = torch.randint(4, VOCAB, (25,), generator=torch.Generator().manual_seed(2))
    [scores] = score_sequences(loaded(model, window=10, batch_size=4), [ids])
    expected = []
    with torch.no_grad():
        for start in range(0, 24, 10):
            window = ids[start : start + 10 + 1]
            logits, _ = model(window[None, :-1])
            expected += logits[0].log_softmax(-1).gather(1, window[1:, None])[:, 0].tolist()
    assert scores.logprobs.tolist() == pytest.approx(expected, abs=1e-5)


def test_a_state_carrying_model_reads_a_text_in_one_pass_and_long_texts_in_columns():
    model, window = model_of("lstm"), 4
    span = window * COLUMN_WINDOWS
    ids = torch.randint(4, VOCAB, (span + 30,), generator=torch.Generator().manual_seed(3))
    [scores] = score_sequences(loaded(model, window=window, batch_size=8), [ids])
    with torch.no_grad():
        first, _ = model(ids[None, :span])  # the first column: one pass, the state carried throughout
        second, _ = model(ids[None, span:-1])  # the next column starts from its first token
    expected = torch.cat([first[0].log_softmax(-1), second[0].log_softmax(-1)]).gather(1, ids[1:, None])[:, 0]
    assert scores.logprobs.tolist() == pytest.approx(expected.tolist(), abs=1e-5)


@pytest.mark.parametrize("name", ["gpt", "lstm", "modern"])
def test_the_batch_size_changes_nothing(name):
    model = model_of(name)
    texts = [torch.randint(4, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (90, 5, 41)]
    one = score_sequences(loaded(model, window=16, batch_size=1), texts, top_k=3)
    many = score_sequences(loaded(model, window=16, batch_size=7), texts, top_k=3)
    for a, b in zip(one, many, strict=True):
        assert a.logprobs.tolist() == pytest.approx(b.logprobs.tolist(), abs=1e-5)
        assert torch.equal(a.top_ids, b.top_ids) and torch.equal(a.ranks, b.ranks)


def test_evaluate_stream_is_the_mean_of_the_scores_within_its_budget():
    model = model_of("gpt")
    ids = torch.randint(4, VOCAB, (80,), generator=torch.Generator().manual_seed(4))
    lm = loaded(model, window=16, batch_size=2)
    [scores] = score_sequences(lm, [ids])
    assert evaluate_stream(lm, ids)["loss"] == pytest.approx(-float(scores.logprobs.mean()), abs=1e-6)
    within = evaluate_stream(lm, ids, max_tokens=20)
    assert within["tokens"] == 20
    assert within["loss"] == pytest.approx(-float(scores.logprobs[:20].mean()), abs=1e-6)
