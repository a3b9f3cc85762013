"""Documented training options, each checked against a value: early stopping, time-based checkpoints,
label smoothing, torch.compile and its fallback, the CPU bf16 probe, tokenizer fitting, target tokenizers
and GPT norm placement. (The optimisation step's options are in tests/test_optim.py.)"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TEXT, base_config_dict, config_from_dict, load_run, scripted, tiny_model_section

import lmzoo.device
from lmzoo.data.batch import PairBatch
from lmzoo.data.prepare import split_text
from lmzoo.data.tokenizer import SPECIALS, fit_tokenizer
from lmzoo.device import pick_precision
from lmzoo.errors import ConfigError, TrainingStopped
from lmzoo.models import build_model
from lmzoo.models.base import PAD_ID
from lmzoo.models.heads import OutputHead
from lmzoo.run import Run, load_config
from lmzoo.run.checkpoint import load_train_state
from lmzoo.training.loop import Trainer, train
from lmzoo.training.objectives import Seq2SeqObjective
from lmzoo.training.setup import setup_training

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
VOCAB = 17


def lm_scores(losses: list[float]) -> list[dict[str, float]]:
    return [{"loss": loss, "ppl": math.exp(loss), "tokens": 100.0} for loss in losses]


def losses_of(config, **kwargs) -> list[tuple[int, float]]:
    seen: list[tuple[int, float]] = []
    train(config, progress=False, on_step=lambda step, loss: seen.append((step, float(loss))), **kwargs)
    return seen


# ---- early stopping and time-based checkpoints ----------------------------------------------------


def test_early_stopping_after_patience_evals_and_resume_keeps_the_counter(tmp_path, make_config, monkeypatch):
    # evaluations at steps 2, 4, 6, ...: the best at step 4, then none better at 6, 8, 10: patience 3 ends it at 10
    losses = [3.0, 2.0, 2.5, 2.4, 2.1, 1.0, 1.0, 1.0]
    extra = {"train": {"max_steps": 20, "eval_every": 2, "patience": 3}}
    scripted(monkeypatch, "lmzoo.training.tasks.lm.evaluate_stream", lm_scores(losses))
    straight = make_config(extra, out_dir=tmp_path / "straight")
    assert [s for s, _ in losses_of(straight)][-1] == 10
    run_dir = Path(straight.out_dir) / straight.name
    assert load_run(run_dir, "last").info["step"] == 10 and load_run(run_dir, "best").info["step"] == 4

    # Interrupted at step 9 (two evaluations without improvement so far), then resumed: it still stops at 10.
    scripted(monkeypatch, "lmzoo.training.tasks.lm.evaluate_stream", lm_scores(losses))

    def interrupt(step: int, loss: float) -> None:
        if step == 9:
            os.kill(os.getpid(), signal.SIGINT)

    split = make_config(extra, out_dir=tmp_path / "split")
    with pytest.raises(TrainingStopped):
        train(split, progress=False, on_step=interrupt)
    run_dir = Path(split.out_dir) / split.name
    state = load_train_state(run_dir / "checkpoints" / "last" / "state.pt")
    assert (state["step"], state["evals_since_best"], state["best_score"]) == (9, 2, 2.0)
    resumed = losses_of(make_config(extra, out_dir=tmp_path / "split"), resume=True)
    assert [s for s, _ in resumed] == [10] and load_run(run_dir, "last").info["step"] == 10


def test_checkpoint_every_minutes_saves_last_when_that_long_has_passed(make_config, monkeypatch):
    clock = {"now": 1000.0}
    monkeypatch.setattr("lmzoo.training.loop._now", lambda: clock["now"])
    saves: list[int] = []
    save_last = Trainer.save_last

    def recording(self) -> None:
        save_last(self)
        saves.append(self.loop.step)

    monkeypatch.setattr(Trainer, "save_last", recording)
    on_disk: dict[int, int] = {}

    def step_takes_25_seconds(step: int, loss: float) -> None:
        last = Path(config.out_dir) / config.name / "checkpoints" / "last"
        on_disk[step] = load_run(last.parent.parent, "last").info["step"] if last.exists() else 0
        clock["now"] += 25.0

    # no step-based save is due before the end (eval_every 100); a save once a minute has passed
    config = make_config({"train": {"max_steps": 12, "eval_every": 100, "checkpoint_every_minutes": 1.0}})
    train(config, progress=False, on_step=step_takes_25_seconds)
    assert saves == [3, 6, 9, 12]  # 75 s after the start, then 75 s after each save
    assert on_disk[4] == 3 and on_disk[7] == 6  # `last` on disk holds the step it was saved at
    saves.clear()
    train(make_config({"train": {"max_steps": 12, "eval_every": 100}}), progress=False)
    assert saves == [12]  # without the option: only step-based saves
    with pytest.raises(ConfigError, match="train.checkpoint_every_minutes"):
        make_config({"train": {"checkpoint_every_minutes": 0}})


# ---- label smoothing ---------------------------------------------------------------------------------


def smoothed(logits: torch.Tensor, targets: torch.Tensor, eps: float) -> torch.Tensor:
    """By hand: (1 - eps) * NLL + eps * the mean over the vocabulary of -log p, averaged over non-pad targets."""
    logp = logits.float().log_softmax(-1)
    nll = -logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    keep = targets != PAD_ID
    return ((1 - eps) * nll + eps * -logp.mean(-1))[keep].mean()


def test_label_smoothing_trains_on_the_smoothed_loss_and_evaluates_the_plain_one(make_config):
    eps = 0.1
    config = make_config({"train": {"label_smoothing": eps, "eval_batches": None}})
    setup = setup_training(config)
    batch, model = setup.task.batches.next(), setup.task.model
    loss, _ = setup.task.objective(model, batch)
    logits, _ = model(batch.inputs)
    assert loss.item() == pytest.approx(smoothed(logits, batch.targets, eps).item(), abs=1e-6)
    assert abs(loss.item() - smoothed(logits, batch.targets, 0.0).item()) > 1e-4  # smoothing changed it
    # Evaluation reports the plain likelihood. By hand: the LSTM carries its state from window to window,
    # so the validation text (one column: it is short) is scored in one forward pass.
    ids = torch.tensor(setup.task.tokenizer.encode(split_text(config.data, "val", 1 << 30)))
    with torch.no_grad():
        logits, _ = model(ids[None, :-1])
    plain = smoothed(logits, ids[None, 1:], 0.0).item()
    assert setup.task.evaluate().values["loss"] == pytest.approx(plain, abs=1e-5)


def test_label_smoothing_of_the_seq2seq_objective_skips_padding():
    torch.manual_seed(0)
    model = build_model(tiny_model_section("seq2seq"), (VOCAB, VOCAB)).eval()
    source = torch.tensor([[5, 6, 7, 3], [8, 9, 3, PAD_ID]])
    target_in = torch.tensor([[2, 5, 6], [2, 7, PAD_ID]])
    target_out = torch.tensor([[5, 6, 3], [7, 3, PAD_ID]])
    loss, tokens = Seq2SeqObjective(label_smoothing=0.2)(model, PairBatch(source, target_in, target_out))
    logits, _ = model(source, target_in)
    assert tokens == 5 and loss.item() == pytest.approx(smoothed(logits, target_out, 0.2).item(), abs=1e-6)


def test_label_smoothing_with_an_adaptive_softmax_is_refused(make_config):
    with pytest.raises(ConfigError, match="train.label_smoothing: needs model.softmax: full"):
        make_config(
            {"model": {"softmax": "adaptive", "adaptive_cutoffs": [8]}, "train": {"label_smoothing": 0.1}}
        )
    head = OutputHead(32, 20, adaptive_cutoffs=[5, 10])
    h, targets = torch.randn(3, 32), torch.tensor([1, 6, 12])
    with pytest.raises(ValueError, match="label smoothing needs softmax: full"):
        head.loss(h, targets, label_smoothing=0.1)
    assert torch.isfinite(head.loss(h, targets))


# ---- torch.compile ------------------------------------------------------------------------------------


def test_compile_trains_through_the_compiled_forward(tmp_path, make_config, monkeypatch):
    calls: list[int] = []

    def fake_compile(model, **options):
        def compiled(*args, **kwargs):
            calls.append(1)
            return model(*args, **kwargs)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    extra = {"train": {"max_steps": 4, "grad_accum": 2}}
    plain = losses_of(make_config(extra, out_dir=tmp_path / "plain"))
    compiled = losses_of(make_config({"train": {**extra["train"], "compile": True}}, out_dir=tmp_path / "c"))
    assert len(calls) == 8 and compiled == plain  # every micro-batch, and the same numbers


@pytest.mark.parametrize("when", ["compiling", "first call"])
def test_compile_failure_falls_back_to_eager_with_one_warning(
    tmp_path, make_config, monkeypatch, capsys, when
):
    def broken(*args, **kwargs):
        raise RuntimeError("Compiler: cc is not found\nand a long explanation")

    monkeypatch.setattr(torch, "compile", broken if when == "compiling" else lambda model, **options: broken)
    plain = losses_of(make_config({"train": {"max_steps": 5}}, out_dir=tmp_path / "plain"))
    capsys.readouterr()
    eager = losses_of(make_config({"train": {"max_steps": 5, "compile": True}}, out_dir=tmp_path / "c"))
    err = capsys.readouterr().err
    assert err.count("warning: torch.compile is unavailable here") == 1
    assert "cc is not found" in err and "long explanation" not in err
    assert eager == plain


# ---- precision -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("faster", "expected"), [(True, "bf16"), (False, "fp32")])
def test_cpu_auto_precision_follows_the_bf16_probe(make_config, monkeypatch, faster, expected):
    probes: list[int] = []
    monkeypatch.setattr(lmzoo.device, "cpu_bf16_is_faster", lambda: probes.append(1) or faster)
    assert pick_precision(CPU, "auto") == expected and probes == [1]
    assert pick_precision(CPU, "fp32") == "fp32" and probes == [1]  # an explicit choice is not probed
    assert setup_training(make_config({"train": {"precision": "auto"}})).precision == expected


@pytest.mark.parametrize(
    ("kernels", "avx512_bf16", "amx", "expected"),
    [
        (True, True, False, True),
        (True, False, True, True),
        (True, False, False, False),
        (False, True, True, False),
    ],
)
def test_cpu_bf16_follows_the_cpu_features_not_a_timing(monkeypatch, kernels, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: kernels)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert lmzoo.device.cpu_bf16_is_faster.__wrapped__() is expected


# ---- tokenizers ----------------------------------------------------------------------------------------


def pair_config(tmp_path: Path, extra: dict | None = None):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{s}\t{s.upper()}\n" for s in TINY_TEXT.splitlines()), encoding="utf-8")
    val = tmp_path / "val.tsv"
    val.write_text("the quiz\tTHE QUIZ\nzebra jump\tZEBRA JUMP\n", encoding="utf-8")
    raw = base_config_dict(tmp_path / "runs", pairs, name="pairs")
    raw["data"] = {"format": "tsv", "train": str(pairs), "val": str(val), "batch_size": 4, "max_len": 32}
    raw["model"] = tiny_model_section("seq2seq")
    raw["train"].update(max_steps=2, eval_every=2, bleu_sentences=0)
    return config_from_dict({**raw, **(extra or {})})


def test_fit_on_all_takes_the_vocabulary_from_every_split(tmp_path, make_config):
    val = tmp_path / "val.txt"
    val.write_text("the quiz\nzebra jump\n", encoding="utf-8")
    unseen = sorted(set("zebra jump quiz") - set(TINY_TEXT))
    assert unseen  # letters only the validation text has
    for fit_on, unknown in (("train", unseen), ("all", [])):
        lm = setup_training(make_config({"data": {"val": str(val)}, "tokenizer": {"fit_on": fit_on}}))
        assert lm.task.tokenizer.unknown_pieces("zebra jump quiz") == unknown, fit_on
        pairs = setup_training(pair_config(tmp_path, {"tokenizer": {"kind": "char", "fit_on": fit_on}}))
        assert pairs.task.target_tokenizer.unknown_pieces("ZEBRA JUMP QUIZ") == [c.upper() for c in unknown]


def test_a_separate_target_tokenizer_for_seq2seq(tmp_path):
    config = pair_config(tmp_path, {"tokenizer": {"kind": "word"}, "target_tokenizer": {"kind": "char"}})
    run = Run.open(train(config, progress=False))
    assert (run.path / "target_tokenizer.json").is_file()
    source, target = run.tokenizer, run.target_tokenizer
    words = set(source.words(TINY_TEXT)) - set(SPECIALS)
    letters = set("\n".join(line.upper() for line in TINY_TEXT.splitlines()))
    assert source.vocab_size == 4 + len(words) and target.vocab_size == 4 + len(letters)
    assert run.vocab_size == (source.vocab_size, target.vocab_size)
    [(text, _)] = run.translate("the cat sat", beam=1, max_new_tokens=12)
    assert set(text) <= letters  # the output side speaks the target vocabulary
    with pytest.raises(ConfigError, match="target_tokenizer: only seq2seq models"):
        char = {"kind": "char"}
        config_from_dict({"model": {"name": "lstm"}, "tokenizer": char, "target_tokenizer": char})


# ---- GPT norm placement ----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_gpt_norm_placement_against_a_hand_composition(norm):
    torch.manual_seed(0)
    model = build_model(tiny_model_section("gpt", norm=norm), VOCAB).eval()
    with torch.no_grad():  # distinct LayerNorm parameters, so a norm in the wrong place shows
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))

    def layer_norm(x, module):
        return F.layer_norm(x, x.shape[-1:], module.weight, module.bias, module.eps)

    with torch.no_grad():
        x = model.token_embedding(ids) + model.position_embedding(torch.arange(7))
        for block in model.blocks:
            if norm == "post":  # x = LN(x + attention(x)); x = LN(x + ff(x)); no final norm
                x = layer_norm(x + block.attn(x, causal=True), block.norm1)
                x = layer_norm(x + block.ff(x), block.norm2)
            else:  # x = x + attention(LN(x)); x = x + ff(LN(x)); a final LN
                x = x + block.attn(layer_norm(x, block.norm1), causal=True)
                x = x + block.ff(layer_norm(x, block.norm2))
        if norm == "pre":
            x = layer_norm(x, model.final_norm)
        expected = x @ model.token_embedding.weight.T  # tied output layer, no bias
        full, _ = model(ids)
        state, steps = model.init_state(2), []
        for t in range(7):  # the KV cache gives the same logits
            logits, state = model(ids[:, t : t + 1], state)
            steps.append(logits)
    assert torch.allclose(full, expected, atol=1e-5)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


# ---- the lecture's model ----------------------------------------------------------------------------------


def test_seed_lstm_has_the_keras_models_parameters_plus_pytorchs_second_biases():
    config = load_config(ROOT / "configs" / "seed_lstm.yaml")
    v = fit_tokenizer(config.tokenizer, split_text(config.data, "train", 1 << 30)).vocab_size
    e, h = config.model.embedding_dim, config.model.hidden_size
    assert (e, h, config.model.num_layers, config.model.head_sizes) == (25, 150, 2, [150])
    keras = (
        v * e  # Embedding(V, 25)
        + 4 * (h * (e + h) + h)  # LSTM(150): four gates, one bias each
        + 4 * (h * (h + h) + h)  # LSTM(150)
        + (h * h + h)  # Dense(150, relu)
        + (h * v + v)  # Dense(V, softmax)
    )
    assert keras == 176 * v + 308_850
    model = build_model(config.model, v)
    assert sum(p.numel() for p in model.parameters()) == keras + 2 * 4 * h  # torch: b_ih and b_hh per gate
    assert (v, keras + 1_200) == (11_985, 2_419_410)  # the README's figures
