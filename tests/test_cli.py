"""The `lmzoo` command line, driven through typer's CliRunner (runs land in tmp_path)."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import TINY_TEXT, base_config_dict, generate, load_run, read_metrics
from typer.testing import CliRunner

from lmzoo import __version__
from lmzoo.cli import app
from lmzoo.inference.sampling import SamplingOptions
from lmzoo.models import list_models
from lmzoo.run import Run


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working directory with a corpus and a tiny config `tiny.yaml` (no name: it comes from the file)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text(TINY_TEXT, encoding="utf-8")
    raw = base_config_dict(tmp_path / "unused", tmp_path / "corpus.txt")
    del raw["name"], raw["out_dir"]  # defaults: the file stem, ./runs
    raw["data"]["train"] = "corpus.txt"
    raw["train"].update(max_steps=6, eval_every=3)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    return tmp_path


def assert_one_error_line(result, *, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_train_writes_the_run_directory(runner, project):
    result = runner.invoke(app, ["train", "tiny.yaml", "--no-progress"])
    assert result.exit_code == 0, result.output
    run = project / "runs" / "tiny"
    for relative in [
        "config.yaml",
        "tokenizer.json",
        "metrics.jsonl",
        "checkpoints/last/model.safetensors",
        "checkpoints/last/state.pt",
        "checkpoints/last/info.json",
        "checkpoints/best/model.safetensors",
        "checkpoints/best/info.json",
    ]:
        assert (run / relative).is_file(), relative
    assert not (run / "checkpoints" / "best" / "state.pt").exists()
    assert list(run.glob("events.out.tfevents.*"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["name"] == "tiny" and saved["data"]["seq_len"] == 8 and saved["train"]["max_steps"] == 6
    assert load_run(run, "last").info["step"] == 6
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert "done: runs/tiny" in result.stderr


def test_train_overrides_device_and_resume(runner, project):
    result = runner.invoke(
        app, ["train", "tiny.yaml", "train.max_steps=2", "model.hidden_size=12", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    run = project / "runs" / "tiny"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["hidden_size"] == 12 and saved["train"]["max_steps"] == 2
    assert load_run(run, "last").model.layers[0].hidden_size == 12
    result = runner.invoke(
        app, ["train", "tiny.yaml", "train.max_steps=4", "model.hidden_size=12", "--resume"]
    )
    assert result.exit_code == 0, result.output
    assert load_run(run, "last").info["step"] == 4
    assert not (project / "runs" / "tiny-2").exists()


def test_train_with_an_unknown_key_is_one_error_line(runner, project):
    raw = yaml.safe_load((project / "tiny.yaml").read_text())
    raw["model"]["hidden_sise"] = 16
    (project / "tiny.yaml").write_text(yaml.safe_dump(raw))
    line = assert_one_error_line(runner.invoke(app, ["train", "tiny.yaml"]))
    assert "model.hidden_sise" in line and "did you mean 'hidden_size'" in line
    assert not (project / "runs").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "missing.yaml"], "config file not found"),
        (["train", "tiny.yaml", "train.lr"], "section.key=value"),
        (["train", "tiny.yaml", "train.lr=-1"], "train.lr"),
        (["generate", "--run", "nowhere", "--seed", "x"], "run directory not found"),
        (["eval"], "no trained run found"),
    ],
)
def test_user_errors_are_one_line(runner, project, args, expected):
    assert expected in assert_one_error_line(runner.invoke(app, args))


def test_generate_prints_the_seed_then_the_continuation(runner, trained_run):
    args = [
        "generate",
        "--run",
        str(trained_run),
        "--seed",
        "the ",
        "--greedy",
        "--max-new-tokens",
        "20",
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run = load_run(trained_run, "best")
    expected = "".join(
        generate(run.model, run.tokenizer, "the ", SamplingOptions(max_new_tokens=20, greedy=True))
    )
    assert result.stdout == "the " + expected + "\n"
    assert len(expected) > 0
    assert runner.invoke(app, args).stdout == result.stdout  # greedy: the same again


def test_generate_with_seed_rng_is_reproducible(runner, trained_run):
    args = [
        "generate",
        "-r",
        str(trained_run),
        "-s",
        "a",
        "--max-new-tokens",
        "30",
        "--temperature",
        "1.2",
        "--device",
        "cpu",
        "--num-samples",
        "2",
    ]
    first = runner.invoke(app, [*args, "--seed-rng", "5"])
    again = runner.invoke(app, [*args, "--seed-rng", "5"])
    assert first.exit_code == 0, first.output
    assert first.stdout == again.stdout
    samples = first.stdout.split("\n---\n")
    assert len(samples) == 2 and all(s.startswith("a") for s in samples)
    others = {runner.invoke(app, [*args, "--seed-rng", str(seed)]).stdout for seed in (6, 7, 8)}
    assert len(others | {first.stdout}) > 1


def test_generate_num_samples_decode_together_as_each_alone(runner, trained_run):
    """--num-samples N decodes the samples together in the batched engine; sample i is what one-at-a-time
    decoding seeded --seed-rng + i writes."""
    args = [
        "generate",
        "-r",
        str(trained_run),
        "-s",
        "the ",
        "--max-new-tokens",
        "25",
        "--temperature",
        "1.0",
    ]
    result = runner.invoke(app, [*args, "--num-samples", "3", "--seed-rng", "9", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    run = Run.open(trained_run)
    alone = [
        "the " + "".join(run.generate("the ", seed=9 + i, max_new_tokens=25, temperature=1.0, device="cpu"))
        for i in range(3)
    ]
    assert result.stdout == "\n---\n".join(alone) + "\n" and len(set(alone)) == 3


def test_generate_stop_and_option_checks(runner, trained_run):
    base = ["generate", "--run", str(trained_run), "--seed", "the", "--greedy", "--device", "cpu"]
    full = runner.invoke(app, [*base, "--max-new-tokens", "40"]).stdout
    stop = full[len("the") + 2 : len("the") + 4]
    cut = runner.invoke(app, [*base, "--max-new-tokens", "40", "--stop", stop]).stdout
    assert cut == full[: full.index(stop, len("the"))] + "\n"
    line = assert_one_error_line(runner.invoke(app, [*base, "--top-p", "1.5"]))
    assert "top_p" in line


def test_generate_interactive_prompt(runner, trained_run):
    result = runner.invoke(
        app,
        ["generate", "--run", str(trained_run), "--greedy", "--max-new-tokens", "5", "--device", "cpu"],
        input="the\na\nexit\n",
    )
    assert result.exit_code == 0, result.output
    run = load_run(trained_run, "best")
    options = SamplingOptions(max_new_tokens=5, greedy=True)
    the, a = ("".join(generate(run.model, run.tokenizer, p, options)) for p in ("the", "a"))
    assert len(the) == len(a) == 5  # five characters each: every requested token was generated
    # each line typed gets its own continuation; "exit" ends the loop at the next prompt
    assert result.stdout == f"seed> the{the}\nseed> a{a}\nseed> "


def test_eval_prints_loss_and_ppl(runner, trained_run):
    result = runner.invoke(app, ["eval", "--run", str(trained_run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    match = re.search(r"loss (\d+\.\d+)\s+ppl (\d+\.\d+)\s+\(([\d,]+) tokens\)", result.stdout)
    assert match, result.stdout
    loss, ppl = float(match.group(1)), float(match.group(2))
    assert ppl == pytest.approx(math.exp(loss), rel=2e-3)
    expected = Run.open(trained_run).evaluate(device="cpu")
    assert loss == pytest.approx(expected["loss"], abs=1e-4)
    assert int(match.group(3).replace(",", "")) == int(expected["tokens"])
    assert "(best) on the val split" in result.stdout


def test_eval_on_a_file(runner, trained_run, tmp_path):
    data = tmp_path / "held_out.txt"
    text = "the cat sat on the mat.\n" * 3
    data.write_text(text, encoding="utf-8")
    result = runner.invoke(
        app,
        ["eval", "--run", str(trained_run), "--data", str(data), "--checkpoint", "last", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    assert f"on {data}" in result.stdout
    match = re.search(r"loss (\d+\.\d+)\s+ppl (\d+\.\d+)\s+\(([\d,]+) tokens\)", result.stdout)
    assert match, result.stdout
    # By hand: the LSTM carries its state from window to window, so every token after the first is
    # scored given the whole text before it: one forward pass over the text.
    run = load_run(trained_run, "last")
    ids = torch.tensor(run.tokenizer.encode(text))
    with torch.no_grad():
        logits, _ = run.model(ids[None, :-1])
    nll = float(F.cross_entropy(logits[0], ids[1:]))
    assert float(match.group(1)) == pytest.approx(nll, abs=1e-4)
    assert float(match.group(2)) == pytest.approx(math.exp(nll), rel=1e-3)
    assert int(match.group(3).replace(",", "")) == len(ids) - 1


# Parameter counts written out from each family's architecture at its default config: an oracle that does not
# build the model. V is the vocabulary; linear layers have a bias unless noted.


def lstm_layer(i: int, h: int) -> int:
    return 4 * h * (i + h) + 8 * h  # PyTorch keeps two bias vectors per gate (b_ih and b_hh)


def gru_layer(i: int, h: int) -> int:
    return 3 * h * (i + h) + 6 * h


def elman_layer(i: int, h: int) -> int:
    return h * (i + h) + h  # h_t = tanh(W_x x_t + W_h h_{t-1} + b): one bias


def recurrent_lm(layer, c: dict, v: int) -> int:
    """Embedding, stacked layers, output layer (defaults: no MLP head, no tying)."""
    sizes = [c["embedding_dim"]] + [c["hidden_size"]] * c["num_layers"]
    stack = sum(layer(i, h) for i, h in zip(sizes, sizes[1:], strict=False))
    return v * c["embedding_dim"] + stack + c["hidden_size"] * v + v


def attention(d: int) -> int:
    return 4 * d * d + 4 * d  # Q, K, V and output projections


def feed_forward(d: int, f: int) -> int:
    return 2 * d * f + f + d


def gpt_params(c: dict, v: int) -> int:
    """Tied token embedding, learned positions, pre-norm blocks (2 LayerNorms each), a final LayerNorm."""
    d = c["d_model"]
    block = attention(d) + feed_forward(d, c["d_ff"] or 4 * d) + 2 * 2 * d
    return v * d + c["context_length"] * d + c["n_layers"] * block + 2 * d


def transformer_params(c: dict, v: int) -> int:
    """One embedding shared by both sides and tied to the output; post-norm layers, no final norms."""
    d, f = c["d_model"], c["d_ff"]
    encoder = attention(d) + feed_forward(d, f) + 2 * 2 * d
    decoder = 2 * attention(d) + feed_forward(d, f) + 3 * 2 * d
    return v * d + c["n_encoder_layers"] * encoder + c["n_decoder_layers"] * decoder


def seq2seq_params(c: dict, v: int) -> int:
    """Two embeddings, a bidirectional LSTM encoder, a bridge to the decoder's first state, an LSTM decoder,
    Luong "general" attention (W, no bias), the combining layer W_c [h; context] and the output layer."""
    e, h = c["embedding_dim"], c["hidden_size"]
    encoder, bridge, decoder = 2 * lstm_layer(e, h), 2 * h * h + h, lstm_layer(e, h)
    return 2 * v * e + encoder + bridge + decoder + 2 * h * h + (3 * h * h + h) + h * v + v


def modern_params(c: dict, v: int) -> int:
    """Tied embedding, no biases; per block two RMSNorm gains, Q, K, V, O and SwiGLU's three matrices of
    width 8/3 d rounded up to ff_multiple_of; a final RMSNorm."""
    d, heads = c["d_model"], c["n_heads"]
    kv, head_dim = c["n_kv_heads"] or heads, d // heads
    f = c["d_ff"] or c["ff_multiple_of"] * math.ceil(8 * d / 3 / c["ff_multiple_of"])
    block = 2 * d + 2 * d * d + 2 * d * kv * head_dim + 3 * d * f
    return v * d + c["n_layers"] * block + d


FORMULAS = {
    "rnn": lambda c, v: recurrent_lm(elman_layer, c, v),
    "lstm": lambda c, v: recurrent_lm(lstm_layer, c, v),
    "gru": lambda c, v: recurrent_lm(gru_layer, c, v),
    "gpt": gpt_params,
    "transformer": transformer_params,
    "seq2seq": seq2seq_params,
    "modern": modern_params,
}


def test_models_lists_the_families_with_their_parameter_counts(runner):
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:-1]}
    assert {"rnn", "lstm", "gru"} <= set(rows) and set(rows) == {info.name for info in list_models()}
    vocab = int(re.search(r"at a (\d+)-token vocabulary", result.stdout).group(1))
    for info in list_models():
        assert rows[info.name][1] == info.kind
        if info.name not in FORMULAS:
            pytest.fail(f"write the parameter formula of family {info.name!r} into FORMULAS")
        expected = FORMULAS[info.name](info.default_config().model_dump(), vocab)
        assert int(rows[info.name][2].replace(",", "")) == expected, info.name


def test_version_and_help(runner):
    assert runner.invoke(app, ["--version"]).stdout == f"lmzoo {__version__}\n"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and all(
        cmd in result.stdout for cmd in ("train", "generate", "eval", "models")
    )


def test_cli_module_does_not_import_torch():
    result = subprocess.run(
        [sys.executable, "-c", "import lmzoo.cli, sys; sys.exit('torch' in sys.modules)"], capture_output=True
    )
    assert result.returncode == 0, result.stderr.decode() or "lmzoo.cli imported torch"
