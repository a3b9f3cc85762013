"""`lmzoo score` and `generate --show-probs` (lmzoo.inference.scoring): per-token log-probabilities that are the
model's own log-softmax, a loss equal to `lmzoo eval`'s on the same text, bits per character, the
OpenAI-shaped records, the surprisal PNG, and one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import pytest
import torch
from conftest import TINY_TEXT, base_config_dict, config_from_dict, deep_merge, tiny_model_section
from typer.testing import CliRunner

from lmzoo.cli import app
from lmzoo.errors import DataError
from lmzoo.run import Run

CPU = torch.device("cpu")
PAIRS = [
    ("the cat", "die katze"),
    ("the dog", "der hund"),
    ("a red cat", "eine rote katze"),
    ("a big dog", "ein grosser hund"),
    ("the red dog", "der rote hund"),
]


def train_tiny(root: Path, name: str, model: dict, steps: int = 12, **sections) -> Path:
    from lmzoo.training.loop import train

    corpus = root / "corpus.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    raw = base_config_dict(root / "runs", corpus, name=name)
    raw["model"] = model
    raw = deep_merge(raw, {"train": {"max_steps": steps, "eval_every": steps}, **sections})
    return train(config_from_dict(raw), progress=False)


@pytest.fixture(scope="session")
def gpt_run(tmp_path_factory) -> Path:
    """A tiny char GPT trained for a few steps (shared, read-only)."""
    return train_tiny(tmp_path_factory.mktemp("gpt_run"), "gpt", tiny_model_section("gpt"))


@pytest.fixture(scope="session")
def seq2seq_run(tmp_path_factory) -> Path:
    """A tiny char Transformer trained on a handful of pairs (shared, read-only)."""
    root = tmp_path_factory.mktemp("s2s_run")
    (root / "pairs.en").write_text("".join(s + "\n" for s, _ in PAIRS * 8), encoding="utf-8")
    (root / "pairs.de").write_text("".join(t + "\n" for _, t in PAIRS * 8), encoding="utf-8")
    data = {"format": "parallel", "train": str(root / "pairs"), "source": "en", "target": "de", "max_len": 32}
    return train_tiny(root, "s2s", tiny_model_section("transformer"), data=data)


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def assert_one_error_line(result, *, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# ---- score equals eval -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["lstm", "gpt"])
@pytest.mark.parametrize("length", [20, 300])  # 300 characters: several eval columns and windows
def test_score_loss_equals_eval_loss_on_the_same_text(family, length, trained_run, gpt_run, tmp_path):
    run = Run.open(trained_run if family == "lstm" else gpt_run)
    text = TINY_TEXT[:length]
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    evaluated = run.evaluate(data=tmp_path / "text.txt", device="cpu")
    scored = run.score(text, device="cpu")
    assert scored.loss == pytest.approx(evaluated["loss"], rel=1e-6)
    assert len(scored.tokens) == evaluated["tokens"]
    assert len(scored.tokens) + len(scored.context) <= len(text)  # eval drops a tail shorter than a column
    assert scored.ppl == pytest.approx(math.exp(scored.loss))


def test_seq2seq_score_is_the_target_given_the_source_as_eval_scores_it(seq2seq_run, tmp_path):
    run = Run.open(seq2seq_run)
    (tmp_path / "one.en").write_text("a red cat\n", encoding="utf-8")
    (tmp_path / "one.de").write_text("eine rote katze\n", encoding="utf-8")
    evaluated = run.evaluate(data=tmp_path / "one", device="cpu", beam=1)
    scored = run.score("eine rote katze", source="a red cat", device="cpu")
    assert scored.loss == pytest.approx(evaluated["loss"], rel=1e-6)
    assert [t.text for t in scored.tokens] == [*"eine rote katze", "<eos>"]
    assert scored.characters == len("eine rote katze")
    other = run.score("eine rote katze", source="the dog", device="cpu")
    assert other.total_logprob != pytest.approx(scored.total_logprob)  # the source matters


# ---- bits per character, top-k -----------------------------------------------------------------------


def test_bits_per_char_on_a_hand_built_uniform_word_model(tmp_path):
    """A word model made uniform over its V words: every token costs ln V nats, and the scored part of
    "the cat sat" is " cat sat" (8 characters; "the" is context only)."""
    path = train_tiny(tmp_path, "words", tiny_model_section("lstm"), steps=2, tokenizer={"kind": "word"})
    run = Run.open(path)
    model = run.model("best", CPU)
    with torch.no_grad():
        model.head.proj.weight.zero_()
        model.head.proj.bias.zero_()
    scored = run.score("the cat sat", device="cpu")
    vocab = run.tokenizer.vocab_size
    assert [t.text for t in scored.tokens] == [" cat", " sat"] and scored.context == [(0, "the")]
    assert [t.logprob for t in scored.tokens] == pytest.approx([-math.log(vocab)] * 2)
    assert scored.loss == pytest.approx(math.log(vocab))
    assert scored.characters == 8
    expected = scored.loss * len(scored.tokens) / (scored.characters * math.log(2))
    assert scored.bits_per_char == pytest.approx(expected)
    assert scored.bits_per_char == pytest.approx(2 * math.log2(vocab) / 8)


def test_top_k_alternatives_are_sorted_and_are_the_models_log_softmax(gpt_run):
    run = Run.open(gpt_run)
    text = "the dog."  # one eval window (seq_len 8): every position sees the whole prefix
    scored = run.score(text, device="cpu", top_k=4)
    ids = run.tokenizer.encode(text)
    with torch.no_grad():
        logits, _ = run.model("best", CPU)(torch.tensor([ids]))
    logprobs = logits[0].log_softmax(-1)  # position t predicts token t + 1
    assert [t.position for t in scored.tokens] == list(range(1, len(ids)))
    for item in scored.tokens:
        row = logprobs[item.position - 1]
        assert item.logprob == pytest.approx(float(row[item.id]), abs=1e-5)
        assert item.rank == int((row > row[item.id]).sum()) + 1
        values = [lp for _, _, lp in item.top]
        assert values == sorted(values, reverse=True) and len(values) == 4
        assert [i for _, i, _ in item.top] == row.topk(4).indices.tolist()
        assert values == pytest.approx(row.topk(4).values.tolist(), abs=1e-5)
        if item.rank <= 4:
            assert item.top[item.rank - 1][1] == item.id


# ---- generation with probabilities ---------------------------------------------------------------------


def with_probs(run: Run, prompt: str, **options) -> list:
    """(text piece, StepProbs) of each generated token."""
    return [(step.text, step.probs) for step in run.decode(prompt, **options)]


def test_generation_records_are_the_models_distribution_and_leave_the_text_unchanged(gpt_run):
    run = Run.open(gpt_run)
    plain = "".join(run.generate("the ", device="cpu", seed=3, max_new_tokens=12, temperature=1.0))
    steps = with_probs(run, "the ", top_logprobs=3, device="cpu", seed=3, max_new_tokens=12, temperature=1.0)
    assert "".join(piece for piece, _ in steps) == plain
    ids = run.tokenizer.encode("the ") + [step.id for _, step in steps]
    with torch.no_grad():
        logits, _ = run.model("best", CPU)(torch.tensor([ids]))
    logprobs = logits[0].log_softmax(-1)
    for offset, (_, step) in enumerate(steps):
        row = logprobs[len(ids) - len(steps) - 1 + offset]
        assert step.logprob == pytest.approx(float(row[step.id]), abs=1e-5)
        assert step.entropy == pytest.approx(float(-(row.exp() * row).sum()), abs=1e-5)
        assert [i for _, i, _ in step.top] == row.topk(3).indices.tolist()
        record = step.to_openai()
        assert set(record) == {"token", "logprob", "bytes", "top_logprobs"}
        assert [alt["logprob"] for alt in record["top_logprobs"]] == [lp for _, _, lp in step.top]


def test_seq2seq_greedy_generation_records_match_the_teacher_forced_score(seq2seq_run):
    run = Run.open(seq2seq_run)
    steps = with_probs(run, "the dog", top_logprobs=2, device="cpu", greedy=True)
    translation = "".join(piece for piece, _ in steps)
    assert translation == "".join(run.generate("the dog", device="cpu", greedy=True))
    assert all(step.top[0][1] == step.id for _, step in steps if step.top[0][1] > 3)  # greedy took the top
    scored = run.score(translation, source="the dog", device="cpu")
    assert [step.logprob for _, step in steps] == pytest.approx(
        [t.logprob for t in scored.tokens[:-1]], abs=1e-5
    )


def test_stop_strings_end_the_records_where_the_text_ends(gpt_run):
    run = Run.open(gpt_run)
    plain = "".join(
        run.generate("the ", device="cpu", seed=5, max_new_tokens=30, temperature=1.0, stop=["t"])
    )
    steps = with_probs(
        run, "the ", top_logprobs=5, device="cpu", seed=5, max_new_tokens=30, temperature=1.0, stop=["t"]
    )
    assert "".join(piece for piece, _ in steps) == plain


# ---- the verbs -----------------------------------------------------------------------------------------


def test_score_json_has_one_record_per_token_and_a_summary(runner, gpt_run):
    result = runner.invoke(
        app, ["score", "--run", str(gpt_run), "--text", "the cat sat", "--json", "--top-k", "3"]
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    scored = Run.open(gpt_run).score("the cat sat", device="cpu", top_k=3)
    assert len(records) == len(scored.tokens) + 1
    for record, item in zip(records, scored.tokens, strict=False):
        assert (record["token"], record["id"], record["rank"]) == (item.text, item.id, item.rank)
        assert record["logprob"] == pytest.approx(item.logprob)
        assert [alt["id"] for alt in record["top_logprobs"]] == [i for _, i, _ in item.top]
    summary = records[-1]["summary"]
    assert summary["loss"] == pytest.approx(scored.loss) and summary["bits_per_char"] == pytest.approx(
        scored.bits_per_char
    )


def test_score_terminal_view_and_png(runner, trained_run, tmp_path):
    out = tmp_path / "surprisal.png"
    result = runner.invoke(
        app, ["score", "--run", str(trained_run), "--text", "the cat sat.", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    scored = Run.open(trained_run).score("the cat sat.", device="cpu")
    assert result.stdout.startswith("the cat sat.")
    assert (
        f"{scored.bits_per_char:.4f} bits/char" in result.stdout and "most surprising tokens" in result.stdout
    )
    image = matplotlib.image.imread(out)
    # 11 scored tokens: one row of bars, max(6, 11 * 0.22 + 1.5) x (2.3 + 0.6) inches at 110 dpi
    assert image.shape[:2] == (round(2.9 * 110), round(6.0 * 110))


def test_generate_show_probs_json_is_openai_shaped(runner, gpt_run):
    args = ["generate", "--run", str(gpt_run), "--seed", "the ", "--max-new-tokens", "6", "--seed-rng", "2"]
    plain = runner.invoke(app, args)
    result = runner.invoke(app, [*args, "--show-probs", "--json", "--top-logprobs", "2"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert "the " + record["text"] == plain.stdout.rstrip("\n")
    assert len(record["logprobs"]["content"]) == 6
    for entry in record["logprobs"]["content"]:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
    shown = runner.invoke(app, [*args, "--show-probs"])
    assert shown.exit_code == 0 and "entropy" in shown.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--run", "no-such-run", "--text", "the"], "run directory not found"),
        (["--text", "\u00e4\u00f6\u00fc"], "no token of the text is in the run's vocabulary"),
        (["--text", "t"], "fewer than 2 tokens"),
        ([], "--text T or --file F"),
        (["--text", "the", "--source", "x"], "--source is for seq2seq runs"),
    ],
)
def test_bad_score_input_is_one_line(runner, trained_run, args, message):
    if "--run" not in args:
        args = ["--run", str(trained_run), *args]
    result = runner.invoke(app, ["score", *args])
    assert message in assert_one_error_line(result)


def test_seq2seq_score_needs_its_source(runner, seq2seq_run):
    result = runner.invoke(app, ["score", "--run", str(seq2seq_run), "--text", "die katze"])
    assert "pass --source" in assert_one_error_line(result)


def test_an_unknown_only_text_is_a_data_error_in_the_library(trained_run):
    with pytest.raises(DataError):
        Run.open(trained_run).score("\u00e4\u00f6", device="cpu")


# ---- lmzoo attention ----------------------------------------------------------------------------------------------


def test_attention_png_grid_has_one_cell_per_layer_and_head(runner, gpt_run, tmp_path):
    out = tmp_path / "heat.png"
    result = runner.invoke(app, ["attention", "--run", str(gpt_run), "--text", "the cat", "--out", str(out)])
    assert result.exit_code == 0, result.output
    image = matplotlib.image.imread(out)
    # tiny GPT: 2 layers x 2 heads; 7 tokens -> 2.6-inch cells; (2 * 2.6 + 1.0) x (2 * 2.6 + 0.5) in at 110 dpi
    assert image.shape[:2] == (round(5.7 * 110), round(6.2 * 110))
    one = tmp_path / "one.png"
    result = runner.invoke(
        app,
        [
            "attention",
            "--run",
            str(gpt_run),
            "--text",
            "the cat",
            "--layer",
            "1",
            "--head",
            "0",
            "--out",
            str(one),
        ],
    )
    assert result.exit_code == 0, result.output
    assert matplotlib.image.imread(one).shape[:2] == (round(3.1 * 110), round(3.6 * 110))


def test_attention_txt_prints_each_matrix_with_token_labels(runner, gpt_run):
    from lmzoo.analysis.attention import attention_maps
    from lmzoo.run import Run

    result = runner.invoke(
        app, ["attention", "--run", str(gpt_run), "--text", "the cat", "--format", "txt", "--layer", "0"]
    )
    assert result.exit_code == 0, result.output
    blocks = result.stdout.strip().split("\n\n")
    assert len(blocks) == 2  # layer 0, heads 0 and 1
    lines = blocks[1].splitlines()
    assert lines[0].startswith("blocks.0.attn head 1")
    assert lines[1].split() == ["t", "h", "e", "\u2423", "c", "a", "t"]
    expected = attention_maps(Run.open(gpt_run), "the cat", device=torch.device("cpu"))[0].weights[1]
    printed = torch.tensor([[float(v) for v in line.split()[1:]] for line in lines[2:]])
    torch.testing.assert_close(printed, expected, atol=0.006, rtol=0)


def test_seq2seq_attention_defaults_to_cross_attention_over_the_source(runner, seq2seq_run):
    result = runner.invoke(
        app,
        [
            "attention",
            "--run",
            str(seq2seq_run),
            "--text",
            "the cat",
            "--target",
            "die katze",
            "--format",
            "txt",
        ],
    )
    assert result.exit_code == 0, result.output
    first = result.stdout.split("\n\n")[0].splitlines()
    assert first[0] == "decoder_layers.0.cross_attn head 0 (cross attention; rows attend to columns)"
    assert first[1].split() == ["t", "h", "e", "\u2423", "c", "a", "t", "<eos>"]
    assert [line.split()[0] for line in first[2:]] == [
        "d",
        "i",
        "e",
        "\u2423",
        "k",
        "a",
        "t",
        "z",
        "e",
        "<eos>",
    ]
    encoder = runner.invoke(
        app,
        ["attention", "--run", str(seq2seq_run), "--text", "the cat", "--which", "self", "--format", "txt"],
    )
    assert encoder.exit_code == 0 and encoder.stdout.startswith("encoder_layers.0.self_attn head 0 (self")


def test_attention_on_a_model_without_attention_is_one_line(runner, trained_run):
    result = runner.invoke(app, ["attention", "--run", str(trained_run), "--text", "the cat"])
    line = assert_one_error_line(result)
    assert "has no attention; use lmzoo score" in line


@pytest.mark.parametrize(
    "extra, message",
    [(["--layer", "7"], "--layer must be between 0 and 1"), (["--which", "cross"], "decoder attention only")],
)
def test_attention_bad_choices_are_one_line(runner, gpt_run, extra, message):
    result = runner.invoke(app, ["attention", "--run", str(gpt_run), "--text", "the cat", *extra])
    assert message in assert_one_error_line(result)
