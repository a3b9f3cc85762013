"""A seq2seq run end to end through the CLI: train on tiny parallel files, translate (greedy, sampled,
beam n-best), evaluate with BLEU; the numbers printed are the library's numbers."""

from __future__ import annotations

import math
import random
import re

import pytest
import yaml
from conftest import load_run, read_metrics, tiny_model_section, translate_stream
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from lmzoo.cli import app
from lmzoo.data.example_files import ExampleSplits
from lmzoo.inference.evaluate import corpus_bleu
from lmzoo.inference.sampling import SamplingOptions
from lmzoo.inference.seq2seq import translate
from lmzoo.run import Run

LEXICON = {
    "the": "die",
    "big": "gross",
    "small": "klein",
    "red": "rot",
    "blue": "blau",
    "cat": "katze",
    "dog": "hund",
    "sees": "sieht",
    "a": "eine",
}
SEED_TEXT = "the small red dog"


def synthetic_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """Short sentences and their word-by-word 'translations'."""
    rng = random.Random(seed)
    words = sorted(LEXICON)
    pairs = []
    for _ in range(count):
        sentence = [rng.choice(words) for _ in range(rng.randint(2, 4))]
        pairs.append((" ".join(sentence), " ".join(LEXICON[w] for w in sentence)))
    return pairs


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def seq2seq_run(tmp_path_factory, runner):
    """`lmzoo train` on 200 tiny parallel pairs (30 steps of a tiny Transformer, about a second); (result, run dir)."""
    root = tmp_path_factory.mktemp("seq2seq_cli")
    pairs = synthetic_pairs(200)
    (root / "pairs.en").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    (root / "pairs.de").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    config = {
        "out_dir": str(root / "runs"),
        "seed": 7,
        "data": {
            "format": "parallel",
            "train": str(root / "pairs"),
            "source": "en",
            "target": "de",
            "max_len": 32,
            "batch_size": 32,
        },
        "tokenizer": {"kind": "char"},
        "model": tiny_model_section("transformer", d_model=32, d_ff=64),  # learns a little in 30 steps
        "train": {
            "max_steps": 30,
            "eval_every": 15,
            "eval_batches": 2,
            "log_every": 5,
            "warmup_steps": 5,
            "lr": 1e-2,
            "device": "cpu",
            "precision": "fp32",
            "bleu_sentences": 4,
        },
        "sample": {"temperature": 1.0},
    }
    (root / "translate.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    result = runner.invoke(app, ["train", str(root / "translate.yaml"), "--no-progress"])
    return result, root / "runs" / "translate"


def test_train_writes_a_seq2seq_run(seq2seq_run):
    result, run = seq2seq_run
    assert result.exit_code == 0, result.output
    for relative in [
        "config.yaml",
        "tokenizer.json",
        "metrics.jsonl",
        "checkpoints/last/model.safetensors",
        "checkpoints/best/model.safetensors",
        "checkpoints/best/info.json",
    ]:
        assert (run / relative).is_file(), relative
    assert not (run / "target_tokenizer.json").exists()  # one shared tokenizer
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["format"] == "parallel" and saved["model"]["name"] == "transformer"
    loaded = load_run(run, "last")
    assert loaded.info["step"] == 30 and loaded.target_tokenizer is loaded.tokenizer
    assert "BLEU" in result.stderr  # the eval lines report BLEU

    # val/bleu lands in metrics.jsonl and in TensorBoard, with the same values, at every eval.
    records = read_metrics(run)
    bleu = [(r["step"], r["val/bleu"]) for r in records if "val/bleu" in r]
    assert [step for step, _ in bleu] == [15, 30]
    assert all(0.0 <= value <= 100.0 for _, value in bleu)
    val_loss = [r["val/loss"] for r in records if "val/loss" in r]
    assert len(val_loss) == 2 and val_loss[1] < val_loss[0] < math.log(loaded.tokenizer.vocab_size)
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    assert {"val/bleu", "loss/val", "val/ppl", "loss/train"} <= set(events.Tags()["scalars"])
    tb = [(e.step, e.value) for e in events.Scalars("val/bleu")]
    assert [s for s, _ in tb] == [15, 30]
    assert [v for _, v in tb] == pytest.approx([v for _, v in bleu], rel=1e-6, abs=1e-6)


def test_generate_translates_one_line(seq2seq_run, runner):
    _, run = seq2seq_run
    base = ["generate", "--run", str(run), "--seed", SEED_TEXT, "--device", "cpu"]
    result = runner.invoke(app, [*base, "--greedy"])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1 and result.stdout.endswith("\n")
    loaded = load_run(run, "best")
    expected = "".join(
        translate_stream(
            loaded.model,
            loaded.tokenizer,
            loaded.target_tokenizer,
            SEED_TEXT,
            max_len=32,
            options=SamplingOptions(greedy=True),
        )
    )
    assert result.stdout == expected + "\n"
    # Sampled (the run's temperature), reproducible with a seed: the library's seeded translation.
    sampled = runner.invoke(app, [*base, "--seed-rng", "3"])
    assert sampled.exit_code == 0, sampled.output
    assert sampled.stdout == "".join(Run.open(run).generate(SEED_TEXT, seed=3, device="cpu")) + "\n"
    assert runner.invoke(app, [*base, "--seed-rng", "3"]).stdout == sampled.stdout


def test_generate_crops_a_text_longer_than_the_model_takes(seq2seq_run, runner):
    """The encoder has 32 positions (model.max_len): a longer text is translated from its first 31 tokens (+ <eos>), as
    `lmzoo eval` does, with a warning, not a traceback."""
    _, run = seq2seq_run
    text = "the big red cat sees the small blue dog and a cat"  # 49 characters
    loaded = load_run(run, "best")
    tok = loaded.tokenizer
    for extra, expected in (
        (
            ["--greedy"],
            "".join(
                translate_stream(
                    loaded.model, tok, tok, text[:31], max_len=32, options=SamplingOptions(greedy=True)
                )
            ),
        ),
        (["--beam", "3"], translate(loaded.model, tok, tok, text[:31], max_len=32, beam=3)[0][0]),
    ):
        result = runner.invoke(
            app, ["generate", "--run", str(run), "--seed", text, "--device", "cpu", *extra]
        )
        assert result.exit_code == 0, (result.output, result.exception)
        assert result.stdout == expected + "\n"
        assert "32 source positions" in result.stderr and "50 tokens" in result.stderr


def test_generate_beam_prints_the_n_best_with_scores(seq2seq_run, runner):
    _, run = seq2seq_run
    result = runner.invoke(
        app,
        [
            "generate",
            "--run",
            str(run),
            "--seed",
            SEED_TEXT,
            "--beam",
            "3",
            "--n-best",
            "2",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    fields = [line.split("\t") for line in lines]
    assert all(len(f) == 2 for f in fields), lines
    scores = [float(score) for _, score in fields]
    assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)
    loaded = load_run(run, "best")
    expected = translate(
        loaded.model, loaded.tokenizer, loaded.target_tokenizer, SEED_TEXT, max_len=32, beam=3, n_best=2
    )
    assert [(text, f"{score:.4f}") for text, score in expected] == [tuple(f) for f in fields]
    # Without --n-best, the best beam alone and no score.
    single = runner.invoke(
        app, ["generate", "--run", str(run), "--seed", SEED_TEXT, "--beam", "3", "--device", "cpu"]
    )
    assert single.stdout == fields[0][0] + "\n"
    bad = runner.invoke(
        app, ["generate", "--run", str(run), "--seed", SEED_TEXT, "--beam", "2", "--n-best", "3"]
    )
    assert bad.exit_code == 2 and "--n-best" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_eval_prints_loss_ppl_and_bleu(seq2seq_run, runner):
    _, run = seq2seq_run
    result = runner.invoke(app, ["eval", "--run", str(run), "--split", "test", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    match = re.search(
        r"on the test split: loss (\d+\.\d+)\s+ppl (\d+\.\d+)\s+BLEU greedy (\d+\.\d+)\s+BLEU beam5 (\d+\.\d+)"
        r"\s+\(([\d,]+) tokens\)",
        result.stdout,
    )
    assert match, result.stdout
    loss, ppl, greedy, beam = (float(match.group(i)) for i in range(1, 5))
    assert ppl == pytest.approx(math.exp(loss), rel=2e-3)
    expected = Run.open(run).evaluate(split="test", device="cpu")
    assert loss == pytest.approx(expected["loss"], abs=1e-4)
    assert greedy == pytest.approx(expected["bleu_greedy"], abs=0.01)
    assert beam == pytest.approx(expected["bleu_beam5"], abs=0.01)
    assert expected["sentences"] == 10  # 5% of 200 pairs
    assert int(match.group(5).replace(",", "")) == int(expected["tokens"])
    assert max(greedy, beam) > 0, "the run learned nothing: the BLEU comparison below would be vacuous"
    # The batched, length-sorted corpus translation gives each sentence what translating it alone gives.
    loaded = load_run(run, "best")
    test_pairs = ExampleSplits(loaded.config.data).split("test")
    sources, references = [s for s, _ in test_pairs], [t for _, t in test_pairs]
    tok = loaded.tokenizer
    for width, printed in ((1, greedy), (5, beam)):
        alone = [translate(loaded.model, tok, tok, text, max_len=32, beam=width)[0][0] for text in sources]
        assert corpus_bleu(alone, references) == pytest.approx(printed, abs=0.01)
