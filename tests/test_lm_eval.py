"""lm-evaluation-harness itself (the real package) on the shipped local task `lmzoo_shakespeare`, offline:
in process (the `lmzoo` model) and against `lmzoo serve` on 127.0.0.1 (lm-eval's `local-completions`,
its remote tokenizer, token-id prompts, echo + logprobs + max_tokens 1). Loglikelihoods and perplexity
equal `lmzoo score` on the same texts, token for token (to 1e-4 per token); generations are equal."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("uvicorn")

from lm_eval.tasks import TaskManager  # noqa: E402
from serve_runs import serve_root, serving  # noqa: E402

from lmzoo.evalharness import TASKS  # noqa: E402
from lmzoo.run import Run  # noqa: E402
from lmzoo.serve import Limits, create_app  # noqa: E402

TASK = "lmzoo_shakespeare"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return serve_root(tmp_path_factory)


@functools.cache
def task_manager() -> TaskManager:
    return TaskManager(include_path=str(TASKS))  # indexing lm-eval's own tasks takes seconds: once


def evaluate(model: Any, model_args: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
    """lm-eval's logged samples of every subtask, by task name."""
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[TASK],
        task_manager=task_manager(),
        log_samples=True,
        verbosity="ERROR",
    )
    return out["samples"]


def check_against_lmzoo_score(samples: dict[str, list[dict[str, Any]]], run: Run) -> int:
    """Every loglikelihood of the multiple-choice task is the sum of `lmzoo score`'s logprobs of the
    choice's tokens after its context (lm-eval moves the context's trailing whitespace into the choice);
    every rolling loglikelihood is `lmzoo score` of the text read after a line break (lm-eval's prefix
    token). Returns how many values were compared."""
    tokenizer, compared = run.tokenizer, 0
    for sample in samples[f"{TASK}_next_line"]:
        for (context, choice), (logprob, greedy) in zip(
            sample["arguments"], sample["filtered_resps"], strict=True
        ):
            scored = run.score(context + choice, device="cpu", top_k=1)
            count = len(tokenizer.encode(context + choice)) - len(tokenizer.encode(context.rstrip()))
            tokens = scored.tokens[-count:]
            assert logprob == pytest.approx(sum(t.logprob for t in tokens), abs=1e-4 * len(tokens))
            assert greedy == all(t.rank == 1 for t in tokens)
            compared += 1
    for sample in samples[f"{TASK}_ppl"]:
        [total] = sample["filtered_resps"]
        scored = run.score("\n" + sample["doc"]["text"], device="cpu", top_k=0)
        assert len(scored.tokens) == len(tokenizer.encode(sample["doc"]["text"]))
        assert total == pytest.approx(scored.total_logprob, abs=1e-4 * len(scored.tokens))
        compared += 1
    return compared


def generations(samples: dict[str, list[dict[str, Any]]]) -> list[str]:
    return [sample["filtered_resps"][0] for sample in samples[f"{TASK}_complete_line"]]


@pytest.fixture(scope="module")
def in_process(root) -> dict[str, dict[str, list[dict[str, Any]]]]:
    from lmzoo.evalharness.model import LmzooLM

    return {name: evaluate(LmzooLM(run=str(root / "runs" / name), device="cpu")) for name in ("gpt", "lstm")}


@pytest.mark.parametrize("name", ["gpt", "lstm"])
def test_lm_eval_in_process_equals_lmzoo_score(root, in_process, name):
    run = Run.open(root / "runs" / name)
    assert check_against_lmzoo_score(in_process[name], run) == 8 * 4 + 8
    expected = [
        "".join(run.generate(s["arguments"][0][0], greedy=True, max_new_tokens=40, stop=["\n"], device="cpu"))
        for s in in_process[name][f"{TASK}_complete_line"]
    ]
    assert generations(in_process[name]) == expected and any(expected)


def test_lm_eval_against_lmzoo_serve_equals_lmzoo_score(root, in_process):
    """local-completions finds the remote tokenizer under the run's own routes (/runs/gpt/...), sends
    token ids, and reads echo + logprobs + max_tokens 1: the same numbers as `lmzoo score`, and the
    same greedy generations as the in-process model."""
    app = create_app(root / "runs", device="cpu", limits=Limits(timeout_s=60))
    with serving(app) as url:
        args = {"model": "gpt", "base_url": f"{url}/runs/gpt/v1/completions", "max_retries": 1}
        samples = evaluate("local-completions", args)
    run = Run.open(root / "runs" / "gpt")
    assert check_against_lmzoo_score(samples, run) == 8 * 4 + 8
    assert generations(samples) == generations(in_process["gpt"])


def test_lmzoo_lm_eval_is_lm_evals_command_line_with_the_lmzoo_model(root, in_process, capsys):
    from typer.testing import CliRunner

    from lmzoo.cli import app

    args = ["lm-eval", "run", "--model", "lmzoo", "--model_args", f"run={root / 'runs' / 'gpt'}"]
    result = CliRunner().invoke(app, [*args, "--tasks", f"{TASK}_ppl", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    table = [line for line in result.stdout.splitlines() if "bits_per_byte" in line]
    totals = [s["filtered_resps"][0] for s in in_process["gpt"][f"{TASK}_ppl"]]
    texts = [s["doc"]["text"] for s in in_process["gpt"][f"{TASK}_ppl"]]
    bits = -sum(totals) / sum(len(t.encode()) for t in texts) / math.log(2)  # lm-eval's bits_per_byte
    assert len(table) == 1 and f"{bits:.4f}" in table[0]


def test_lmzoo_lm_eval_without_lm_eval_says_how_to_install(monkeypatch):
    import importlib.util

    from typer.testing import CliRunner

    from lmzoo.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a)
    )
    result = CliRunner().invoke(app, ["lm-eval", "run", "--model", "lmzoo"])
    assert result.exit_code == 2 and "pip install 'lmzoo[harness]'" in result.output
    assert result.output.count("\n") == 1
