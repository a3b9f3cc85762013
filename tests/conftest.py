"""Shared fixtures: tiny corpora, a tiny-config factory, tiny models and one shared trained run.

Everything here is sized to keep the whole suite well under two minutes on a 2-core CPU.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from lmzoo.config.schema import RunConfig
from lmzoo.run import Run, resolve_config

# The suite shares a small machine: one intra-op thread is also the fastest for these tiny models.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _corpus_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Prepared corpora go to a cache of the session's own (and so do the subprocesses' it starts)."""
    os.environ["LMZOO_CACHE_DIR"] = str(tmp_path_factory.mktemp("prepared"))


SENTENCES = [
    "the cat sat on the mat.",
    "the dog ate the bone.",
    "a bird sang in the tree.",
]
TINY_TEXT = "".join(line + "\n" for line in SENTENCES * 15)  # 45 lines, ~1000 characters


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_model_section(name: str, *, optional: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A `model:` section for family `name` at the tiny size the family itself declares (tiny_config).

    `extra` keys are always set (a typo is a config error); `optional` ones only if the family has them.
    """
    from lmzoo.models import get_model_info, tiny_model_config

    fields = get_model_info(name).config.model_fields
    return tiny_model_config(name, **{**{k: v for k, v in (optional or {}).items() if k in fields}, **extra})


@dataclass
class LoadedRun:
    """A run opened with one checkpoint's model loaded: what the tests read back."""

    run: Run
    model: torch.nn.Module
    info: dict[str, Any]

    @property
    def config(self) -> RunConfig:
        return self.run.config

    @property
    def tokenizer(self):
        return self.run.tokenizer

    @property
    def target_tokenizer(self):
        return self.run.target_tokenizer

    @property
    def path(self) -> Path:
        return self.run.path


def load_run(path: Path | str, tag: str = "best", device: str = "cpu") -> LoadedRun:
    run = Run.open(path)
    return LoadedRun(run, run.model(tag, device), run.info(tag))


def config_from_dict(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """A validated RunConfig from a raw dict (init_from resolved, as `lmzoo train` does)."""
    return resolve_config(raw, source=source)


def scripted(monkeypatch, target: str, values: list[Any], snapshots: list | None = None) -> None:
    """Replace `target` (e.g. "lmzoo.training.tasks.lm.evaluate_stream") by a function returning the next of
    `values`, in order and across resumed runs; with `snapshots`, also keep the weights of the model (its
    first argument) at each call. Tests script validation results this way and check what the trainer does with them."""
    script = iter(values)

    def fake(*args: Any, **kwargs: Any) -> Any:
        if snapshots is not None:
            model = getattr(args[0], "model", args[0])  # a bare model, or a LoadedModel around it
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return copy.deepcopy(next(script))

    monkeypatch.setattr(target, fake)


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


def base_config_dict(out_dir: Path, corpus: Path, name: str = "tiny") -> dict[str, Any]:
    return {
        "name": name,
        "out_dir": str(out_dir),
        "seed": 1234,
        "data": {"train": str(corpus), "batch_size": 4, "seq_len": 8},
        "tokenizer": {"kind": "char"},
        "model": {"name": "lstm", "embedding_dim": 8, "hidden_size": 16, "num_layers": 1, "dropout": 0.0},
        "train": {
            "max_steps": 20,
            "eval_every": 10,
            "eval_batches": 2,
            "log_every": 1,
            "warmup_steps": 2,
            "lr": 1e-2,
            "device": "cpu",
            "precision": "fp32",
        },
        "sample": {"max_new_tokens": 10},
    }


@pytest.fixture
def make_config(tmp_path: Path, corpus_file: Path):
    """Factory: make_config({"train": {"max_steps": 5}}) -> a validated tiny RunConfig under tmp_path/runs.

    Sections are merged into the tiny defaults; a `model` section with a `name` replaces the default one.
    """

    def factory(extra: dict | None = None, *, out_dir: Path | None = None) -> RunConfig:
        raw = base_config_dict(out_dir or tmp_path / "runs", corpus_file)
        extra = dict(extra or {})
        if "name" in extra.get("model", {}):  # a whole model section (another family): replace, don't merge
            raw["model"] = extra.pop("model")
        return config_from_dict(deep_merge(raw, extra))

    return factory


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One tiny LSTM run trained once and shared (read-only) by the generate / CLI / tracking tests."""
    from lmzoo.training.loop import train

    root = tmp_path_factory.mktemp("shared_run")
    corpus = root / "corpus.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    raw = deep_merge(base_config_dict(root / "runs", corpus, name="shared"), {"train": {"max_steps": 30}})
    return train(config_from_dict(raw), progress=False)


# ---- figures printed at the end of a run (the reliability suite reports its trial counts) ----------

FIGURES: list[str] = []


def report_figure(line: str) -> None:
    """Record a measured figure; pytest prints all of them in its terminal summary."""
    FIGURES.append(line)


def run_trials(label: str, keys: Sequence[Any], trial: Callable[[Any], None]) -> None:
    """Run every trial (one per seed or case), then report "label: k/N" naming the failing ones, then assert.

    A failure does not stop the others, so the figure is a real count and not only ever N/N.
    """
    failures: dict[Any, str] = {}
    for key in keys:
        try:
            trial(key)
        except (Exception, pytest.fail.Exception) as err:
            failures[key] = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    failing = f" (failing: {', '.join(map(str, failures))})" if failures else ""
    report_figure(f"{label}: {len(keys) - len(failures)}/{len(keys)}{failing}")
    assert not failures, failures


def pytest_terminal_summary(terminalreporter) -> None:
    if FIGURES:
        terminalreporter.section("lmzoo reliability figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


# ---- reading what runs wrote, and generating from bare models ---------------------------------------


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a run directory's metrics.jsonl."""
    from lmzoo.run.layout import METRICS_FILE
    from lmzoo.run.metrics import read_metrics as read_file

    return read_file(Path(run_dir) / METRICS_FILE)


def read_history(run_dir: Path) -> Any:
    from lmzoo.run.layout import METRICS_FILE
    from lmzoo.run.metrics import read_history as read_file

    return read_file(Path(run_dir) / METRICS_FILE)


def generate(model: Any, tokenizer: Any, prompt: str, options: Any, **kwargs: Any) -> Any:
    """Text pieces of `model` continuing `prompt` through the one decoding loop (a bare model, fp32)."""
    from lmzoo.inference.decoding import decode
    from lmzoo.inference.loaded import LoadedModel

    return (
        step.text for step in decode(LoadedModel(model, tokenizer), prompt, options, **kwargs) if step.text
    )


def translate_stream(
    model: Any, source_tokenizer: Any, target_tokenizer: Any, text: str, *, max_len: int, options: Any
) -> Any:
    """Text pieces of a seq2seq model's translation of `text` through the one decoding loop."""
    from lmzoo.inference.decoding import decode
    from lmzoo.inference.loaded import LoadedModel

    lm = LoadedModel(model, source_tokenizer, target_tokenizer, max_target_len=max_len)
    return (step.text for step in decode(lm, text, options) if step.text)
