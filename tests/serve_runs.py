"""Tiny runs for the serving tests, trained once per session: a char LSTM, a char GPT and a char seq2seq
Transformer in one runs folder, and a sentinel run outside it (reachable only through a symlink)."""

from __future__ import annotations

import random
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conftest import TINY_TEXT, base_config_dict, config_from_dict, deep_merge, tiny_model_section

_CACHE: dict[str, Path] = {}
WORDS = {"the": "die", "cat": "katze", "dog": "hund", "sees": "sieht", "a": "eine", "red": "rot"}


def _train(raw: dict) -> Path:
    from lmzoo.training.loop import train

    return train(config_from_dict(raw), progress=False)


def serve_root(tmp_path_factory) -> Path:
    """root/runs/{lstm,gpt,translate} and root/outside/secret (a run the server must never read)."""
    if "root" in _CACHE:
        return _CACHE["root"]
    root = tmp_path_factory.mktemp("serve")
    corpus = root / "corpus.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    runs = root / "runs"
    lstm = base_config_dict(runs, corpus, name="lstm")
    _train(deep_merge(lstm, {"train": {"max_steps": 30}}))
    gpt = base_config_dict(runs, corpus, name="gpt")
    gpt["model"] = tiny_model_section("gpt")
    _train(deep_merge(gpt, {"data": {"seq_len": 32}, "train": {"max_steps": 40}}))
    _train(_seq2seq_config(root, runs))
    secret = _train(base_config_dict(root / "outside", corpus, name="secret") | {"train": lstm["train"]})
    (secret / "SENTINEL").write_text("never read me", encoding="utf-8")
    _CACHE["root"] = root
    return root


def _seq2seq_config(root: Path, runs: Path) -> dict:
    rng = random.Random(0)
    words = sorted(WORDS)
    pairs = [[rng.choice(words) for _ in range(rng.randint(2, 4))] for _ in range(120)]
    (root / "pairs.en").write_text("".join(" ".join(p) + "\n" for p in pairs), encoding="utf-8")
    (root / "pairs.de").write_text(
        "".join(" ".join(WORDS[w] for w in p) + "\n" for p in pairs), encoding="utf-8"
    )
    return {
        "name": "translate",
        "out_dir": str(runs),
        "seed": 7,
        "data": {
            "format": "parallel",
            "train": str(root / "pairs"),
            "source": "en",
            "target": "de",
            "max_len": 32,
        },
        "tokenizer": {"kind": "char"},
        "model": tiny_model_section("transformer"),
        "train": {
            "max_steps": 20,
            "eval_every": 10,
            "eval_batches": 1,
            "warmup_steps": 2,
            "lr": 1e-2,
            "device": "cpu",
            "precision": "fp32",
        },
    }


def copy_runs(root: Path, target: Path) -> Path:
    """A private copy of the runs folder (for tests that delete or add runs)."""
    shutil.copytree(root / "runs", target, symlinks=True)
    return target


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """uvicorn serving `app` in a thread on a free loopback port; yields the base URL."""
    import uvicorn

    port = free_port()
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        instance.should_exit = True
        thread.join(timeout=15)
