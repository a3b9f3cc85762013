"""The reliability suite, part 1: real `python -m lmzoo train` processes killed and signalled.

    pytest -m reliability

Each test runs every trial, then reports "k/N" with the failing seeds in pytest's terminal summary
(tests/conftest.py report_figure), then asserts. A seed reproduces its trial.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY_TEXT, base_config_dict, load_run, read_metrics, report_figure, run_trials

from lmzoo.run import Run, load_config
from lmzoo.run import checkpoint as ckpt
from lmzoo.run.checkpoint import load_train_state
from lmzoo.training.loop import train

pytestmark = pytest.mark.reliability
ROOT = Path(__file__).resolve().parent.parent


# ---- helpers for real training processes ---------------------------------------------------------


def write_process_config(tmp_path: Path, name: str, *, model: dict | None = None, **train_extra) -> Path:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(TINY_TEXT * 4, encoding="utf-8")
    raw = base_config_dict(tmp_path / "runs", corpus, name=name)
    raw["model"] = model or {
        "name": "lstm",
        "embedding_dim": 32,
        "hidden_size": 64,
        "num_layers": 2,
        "dropout": 0.1,
    }
    raw["train"].update({"max_steps": 400, "eval_every": 1000, "checkpoint_every": 1, **train_extra})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Training:
    """A `python -m lmzoo train` process whose stderr is read line by line as it arrives."""

    def __init__(self, config: Path, *extra: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lmzoo", "train", str(config), "--no-progress", *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=config.parent,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def finish(self, timeout: float = 120.0) -> int:
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code

    def stop(self) -> None:
        """Kill the process if it still runs (a failed trial must not leave it behind)."""
        if self.process.poll() is None:
            self.process.kill()
        self.finish(timeout=30)


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


# ---- crash during checkpoint writes -------------------------------------------------------------


def test_sigkill_at_random_moments_leaves_a_loadable_resumable_checkpoint(tmp_path):
    def trial(seed: int) -> None:
        name = f"crash{seed}"
        config = write_process_config(tmp_path, name)
        run_dir = tmp_path / "runs" / name
        training = Training(config)
        try:
            process = training.process
            wait_for(lambda: (run_dir / "checkpoints" / "last").exists() or process.poll() is not None)
            time.sleep(random.Random(seed).uniform(0.0, 0.6))  # a checkpoint every step: kills land in writes
            process.kill()
        finally:
            training.stop()
        last = ckpt.checkpoint_dir(run_dir, "last")  # the newest complete checkpoint (mid-swap included)
        for final in (run_dir / "checkpoints").iterdir():  # nothing partial under a final name
            if not final.name.startswith("."):
                assert (final / "info.json").is_file() and (final / "model.safetensors").is_file()
        step = load_run(run_dir, "last").info["step"]
        assert load_train_state(last / "state.pt")["step"] == step
        cfg = load_config(config, [f"train.max_steps={step + 2}", "train.checkpoint_every=1"])
        train(cfg, resume=True, progress=False)
        assert load_run(run_dir, "last").info["step"] == step + 2
        leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
        leftovers += [p.name for p in run_dir.glob(".*.tmp-*")]
        assert leftovers == [], leftovers  # temp files are cleaned at the next start

    run_trials("SIGKILL at random moments (checkpoint every step): loaded and resumed", range(50), trial)


# ---- signals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_save_at_the_next_step_and_resume_from_it(tmp_path, sig, code):
    def trial(seed: int) -> None:
        name = f"{sig.name.lower()}{seed}"
        config = write_process_config(tmp_path, name, checkpoint_every=1000)
        run_dir = tmp_path / "runs" / name
        training = Training(config)
        try:
            target = random.Random(seed).randint(2, 25)
            wait_for(lambda: logged_steps(run_dir) >= target or training.process.poll() is not None)
            sent = time.monotonic()
            training.process.send_signal(sig)
            returncode = training.finish(timeout=30)
            elapsed = time.monotonic() - sent
        finally:
            training.stop()
        stopped = re.search(r"interrupted at step (\d+)/", training.stderr)
        assert returncode == code and stopped, training.stderr[-500:]
        step = int(stopped.group(1))
        assert step >= target and load_run(run_dir, "last").info["step"] == step
        assert elapsed < 30
        cfg = load_config(config, [f"train.max_steps={step + 1}"])
        seen: list[int] = []
        train(cfg, resume=True, progress=False, on_step=lambda s, loss: seen.append(s))
        assert seen == [step + 1]  # the resumed run picks up at the saved step

    seeds = range(int(sig) * 100, int(sig) * 100 + 20)
    run_trials(
        f"{sig.name} at random steps: saved at the step boundary, exited with {code} within 30 s, "
        "resumed from that step",
        seeds,
        trial,
    )


SLOW_MODEL = {"name": "lstm", "embedding_dim": 64, "hidden_size": 768, "num_layers": 2}  # ~1 s a step


def test_a_second_ctrl_c_exits_at_once_without_saving(tmp_path):
    """The second SIGINT is sent only once the first was acknowledged, in the middle of a slow step."""
    config = write_process_config(tmp_path, "twice", model=SLOW_MODEL, checkpoint_every=1000)
    raw = yaml.safe_load(config.read_text())
    raw["data"].update(batch_size=16, seq_len=64)
    config.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "runs" / "twice"
    training = Training(config)
    try:
        wait_for(lambda: logged_steps(run_dir) >= 1, timeout=120)
        training.process.send_signal(signal.SIGINT)
        wait_for(lambda: "SIGINT received" in training.stderr, timeout=30)
        training.process.send_signal(signal.SIGINT)
        start = time.monotonic()
        returncode = training.finish(timeout=30)
        elapsed = time.monotonic() - start
    finally:
        training.stop()
    assert returncode == 130 and elapsed < 10, training.stderr[-500:]
    assert "interrupted at step" not in training.stderr  # the graceful stop did not happen...
    assert not (run_dir / "checkpoints").exists()  # ...and nothing was saved
    report_figure(
        f"a second Ctrl-C after the first was acknowledged: exit 130 in {elapsed:.1f} s, nothing saved"
    )


# ---- requeued jobs: always --resume -------------------------------------------------------------------


def test_sigkill_before_the_first_checkpoint_then_resume_finishes_the_run(tmp_path):
    """A requeued job runs the same `--resume` command again; the first attempt died before any checkpoint."""

    def trial(seed: int) -> None:
        name = f"early{seed}"
        config = write_process_config(tmp_path, name, checkpoint_every=1000)
        runs = tmp_path / "runs"
        first = Training(config, "--resume")
        try:
            target = random.Random(seed).randint(2, 30)
            wait_for(lambda: logged_steps(runs / name) >= target or first.process.poll() is not None)
            first.process.kill()
        finally:
            first.stop()
        assert "has no checkpoint" in first.stderr and not (runs / name / "checkpoints").exists()
        again = Training(config, "--resume")
        try:
            assert again.finish() == 0, again.stderr[-500:]
        finally:
            again.stop()
        assert "has no checkpoint" in again.stderr and "starting it at step 0" in again.stderr
        finished = Run.latest(runs, name)
        assert finished is not None and load_run(finished, "last").info["step"] == 400

    run_trials(
        "SIGKILL before the first checkpoint, then the same --resume command: finished", range(3), trial
    )


def test_sigkill_after_a_timed_checkpoint_then_resume_continues_from_it(tmp_path):
    """train.checkpoint_every_minutes saves `last` although no step-based save is due for 1000 steps."""

    def trial(seed: int) -> None:
        name = f"timed{seed}"
        config = write_process_config(
            tmp_path, name, checkpoint_every=1000, checkpoint_every_minutes=0.01, max_steps=3000
        )
        run_dir = tmp_path / "runs" / name
        first = Training(config, "--resume")
        try:
            wait_for(lambda: (run_dir / "checkpoints" / "last").exists() or first.process.poll() is not None)
            time.sleep(random.Random(seed).uniform(0.0, 1.0))
            first.process.kill()
        finally:
            first.stop()
        saved = load_run(run_dir, "last").info["step"]
        assert 0 < saved < 1000  # a time-based save: no step-based one was due
        again = Training(config, "--resume")
        try:
            assert again.finish(timeout=300) == 0, again.stderr[-500:]
        finally:
            again.stop()
        assert "lmzoo: resuming" in again.stderr and "has no checkpoint" not in again.stderr
        resumes = [r["step"] for r in read_metrics(run_dir) if r.get("event") == "resume"]
        assert resumes == [saved]  # it went on from the checkpoint, in the same run directory
        assert (
            load_run(run_dir, "last").info["step"] == 3000 and Run.latest(tmp_path / "runs", name) == run_dir
        )

    run_trials(
        "SIGKILL after a time-based checkpoint (every 0.6 s), then --resume: continued from it",
        range(3),
        trial,
    )


# ---- a prepare killed at any moment ---------------------------------------------------------------------


def test_sigkill_during_prepare_leaves_a_state_the_next_prepare_completes(tmp_path):
    """SIGKILL `lmzoo prepare` while it scans, fits or writes; the next prepare finishes and its token
    files equal those of a prepare that was never interrupted."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TINY_TEXT * 30_000, encoding="utf-8")  # ~30 MB: a few seconds of word tokenizing
    config = tmp_path / "cfg.yaml"
    raw = base_config_dict(tmp_path / "runs", corpus)
    raw["tokenizer"] = {"kind": "word"}
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "lmzoo", "prepare", str(config), "--no-progress"]

    def prepare(cache: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            command, env={**env, "LMZOO_CACHE_DIR": str(cache)}, capture_output=True, text=True
        )

    clean = prepare(tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr
    [reference] = (tmp_path / "clean").glob("*/tok-*")

    def trial(seed: int) -> None:
        cache = tmp_path / f"killed-{seed}"
        process = subprocess.Popen(
            command, env={**env, "LMZOO_CACHE_DIR": str(cache)}, stdout=subprocess.DEVNULL
        )
        time.sleep(random.Random(seed).uniform(0.5, 4.0))  # imports, scan, fit, or in the middle of writing
        process.kill()
        process.wait(timeout=30)
        kept = [p for p in cache.glob("*/tok-*") if ".tmp-" not in p.name]
        assert all((p / "manifest.json").is_file() for p in kept)  # under its final name only when complete
        again = prepare(cache)
        assert again.returncode == 0 and again.stdout.startswith(("prepared: ", "up to date: ")), again.stderr
        [directory] = cache.glob("*/tok-*")
        for name in ("train.bin", "val.bin", "test.bin", "tokenizer.json"):
            assert (directory / name).read_bytes() == (reference / name).read_bytes(), name
        assert not list(cache.glob("*/*.tmp-*"))

    run_trials("prepare killed at a random moment, then prepared again", list(range(6)), trial)
