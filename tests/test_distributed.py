"""Data-parallel training on CPU with gloo: 2 processes (torchrun, or the torchrun environment set by
hand when a test needs each worker's exit code) against one process with the global batch.

Every launch runs in a directory of its own, so what the workers wrote can be listed exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from conftest import (
    TINY_TEXT,
    base_config_dict,
    config_from_dict,
    deep_merge,
    generate,
    load_run,
    read_metrics,
    tiny_model_section,
)
from typer.testing import CliRunner

from lmzoo.cli import app
from lmzoo.inference.sampling import SamplingOptions
from lmzoo.run.checkpoint import load_train_state
from lmzoo.training.loop import train

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo"
    ),
]

STEPS = 50
PER_RANK_BATCH = 2
LAUNCH_TIMEOUT = 240  # seconds; a tiny run takes ~10 s (mostly imports) on a busy 2-core machine
RANK_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
    "ROLE_RANK",
    "TORCHELASTIC_RUN_ID",
)


def config_dict(family: str) -> dict:
    """A tiny run; data and out_dir are relative to the launch directory."""
    raw = base_config_dict(Path("runs"), Path("corpus.txt"), name=family)
    if family == "gpt":
        raw["model"] = tiny_model_section("gpt")  # random windows (sampling auto)
    # lstm: the conftest default, 1 layer, dropout 0: sequential batches with a carried state
    return deep_merge(
        raw,
        {
            "data": {"batch_size": PER_RANK_BATCH, "eval_batch_size": 2},
            "train": {"max_steps": STEPS, "eval_every": 25, "warmup_steps": 5},  # cosine schedule
        },
    )


def make_launch_dir(root: Path, label: str, raw: dict) -> Path:
    where = root / label
    where.mkdir(parents=True)
    (where / "corpus.txt").write_text(TINY_TEXT, encoding="utf-8")
    (where / "cfg.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    return where


def worker_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RANK_ENV}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def torchrun(where: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "lmzoo",
        "train",
        "cfg.yaml",
        *args,
        "--no-progress",
    ]
    result = subprocess.run(
        command, cwd=where, env=worker_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(where: Path, *args: str, world: int = 2) -> list[subprocess.Popen]:
    """The workers torchrun would start, with its environment set by hand, in one process group."""
    port, procs = free_port(), []
    for rank in range(world):
        env = worker_env(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE=str(world),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world),
        )
        group = 0 if rank == 0 else procs[0].pid
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "lmzoo", "train", "cfg.yaml", *args, "--no-progress"],
                cwd=where,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                preexec_fn=lambda g=group: os.setpgid(0, g),
            )
        )
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = LAUNCH_TIMEOUT) -> list[tuple[int, str]]:
    """(exit code, stderr) of every worker; kills the group if they do not end in time."""
    results = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            results.append((p.returncode, err))
    except subprocess.TimeoutExpired:
        kill_group(procs)
        raise
    return results


def kill_group(procs: list[subprocess.Popen]) -> None:
    try:
        os.killpg(procs[0].pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for p in procs:
        p.kill()
        p.communicate()


def wait_for_steps(
    run_dir: Path, procs: list[subprocess.Popen], steps: int, timeout: float = LAUNCH_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if (
            metrics.exists()
            and sum('"train/loss"' in line for line in metrics.read_text().splitlines()) >= steps
        ):
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.005)
    kill_group(procs)
    pytest.fail(f"the workers did not reach step {steps}")


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in read_metrics(run_dir) if "train/loss" in r]


def val_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val/loss"]) for r in read_metrics(run_dir) if "val/loss" in r]


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def expected_files(run: str) -> set[str]:
    ckpt = f"runs/{run}/checkpoints"
    return {
        "cfg.yaml",
        "corpus.txt",
        f"runs/{run}/config.yaml",
        f"runs/{run}/tokenizer.json",
        f"runs/{run}/metrics.jsonl",
        f"{ckpt}/last/model.safetensors",
        f"{ckpt}/last/state.pt",
        f"{ckpt}/last/info.json",
        f"{ckpt}/best/model.safetensors",
        f"{ckpt}/best/info.json",
    }


def events_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("events.out.tfevents.*"))


def assert_close_losses(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> None:
    assert [s for s, _ in a] == [s for s, _ in b]
    for (step, x), (_, y) in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-5), f"step {step}: {x} vs {y}"


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if key.endswith("attn.in_proj.bias"):
            # The key bias adds the same q.b_k to every score of a query: softmax ignores it, its true
            # gradient is 0, and AdamW turns the rounding noise there into lr-sized steps. Only Q and V count.
            d = x.shape[0] // 3
            x, y = torch.cat([x[:d], x[2 * d :]]), torch.cat([y[:d], y[2 * d :]])
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Per family: an uninterrupted 2-process torchrun run and a 1-process run with the global batch."""
    root = tmp_path_factory.mktemp("distributed")
    found: dict[str, dict] = {}
    for family in ("lstm", "gpt"):
        raw = config_dict(family)
        where = make_launch_dir(root, f"{family}_ddp", raw)
        result = torchrun(where)
        single = deep_merge(
            raw,
            {
                "out_dir": str(root / f"{family}_single"),
                "data": {"train": str(where / "corpus.txt"), "batch_size": 2 * PER_RANK_BATCH},
            },
        )
        found[family] = {
            "root": root,
            "raw": raw,
            "where": where,
            "ddp": where / "runs" / family,
            "stderr": result.stderr,
            "single": train(config_from_dict(single), progress=False),
        }
    return found


# ---- 2 x batch b == 1 x batch 2b -------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["lstm", "gpt"])
def test_two_processes_match_one_process_with_the_global_batch(runs, family):
    run = runs[family]
    ddp, single = run["ddp"], run["single"]
    losses = train_losses(ddp)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    assert_close_losses(losses, train_losses(single))
    assert_close_losses(val_losses(ddp), val_losses(single))
    assert [s for s, _ in val_losses(ddp)] == [25, 50]
    assert_close_weights(
        load_run(ddp, "last").model.state_dict(), load_run(single, "last").model.state_dict()
    )
    globals_ = [r["global_batch"] for r in read_metrics(ddp) if "global_batch" in r]
    assert globals_ == [4.0]
    # Rank 0 alone speaks: one start line (with the global batch) and one "done" line.
    assert run["stderr"].count("lmzoo: training") == 1
    assert f"2 processes x batch {PER_RANK_BATCH} x accumulation 1 = global batch 4" in run["stderr"]
    assert run["stderr"].count("done: ") == 1

    state = load_train_state(ddp / "checkpoints" / "last" / "state.pt")
    assert state["world_size"] == 2 and state["step"] == STEPS and len(state["ranks"]) == 2
    assert not torch.equal(
        state["ranks"][0]["rng"]["torch"], state["ranks"][1]["rng"]["torch"]
    )  # seed + rank
    if family == "lstm":
        # Each rank carries the recurrent state of its own rows of the global batch.
        whole = load_train_state(single / "checkpoints" / "last" / "state.pt")["ranks"][0]["carried"]
        for rank in range(2):
            mine = state["ranks"][rank]["carried"]
            rows = slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH)
            for layer, layer_whole in zip(mine, whole, strict=True):
                for part, part_whole in zip(layer, layer_whole, strict=True):
                    assert part.shape == (1, PER_RANK_BATCH, 16)
                    torch.testing.assert_close(part, part_whole[:, rows], rtol=1e-4, atol=1e-5)
    else:
        assert all(r["carried"] is None for r in state["ranks"])


@pytest.mark.parametrize("family", ["lstm", "gpt"])
def test_only_rank_zero_writes_files(runs, family):
    where, ddp = runs[family]["where"], runs[family]["ddp"]
    assert len(events_files(ddp)) == 1
    expected = expected_files(family) | {str(events_files(ddp)[0].relative_to(where))}
    assert files_under(where) == expected
    assert len(read_metrics(ddp)) == len(
        {json.dumps(r, sort_keys=True) for r in read_metrics(ddp)}
    )  # no doubles


# ---- interruption and resume --------------------------------------------------------------------------


def test_sigterm_saves_one_checkpoint_and_resume_matches_the_uninterrupted_run(runs):
    run = runs["lstm"]
    where = make_launch_dir(run["root"], "lstm_interrupted", run["raw"])
    run_dir = where / "runs" / "lstm"
    procs = launch(where)
    wait_for_steps(run_dir, procs, 1)
    os.killpg(procs[0].pid, signal.SIGTERM)  # what Ctrl-C / a scheduler does to the torchrun group
    results = finish(procs, timeout=120)
    assert [code for code, _ in results] == [143, 143], results[0][1][-2000:]

    # One consistent `last` checkpoint at the step every rank agreed to stop at.
    info = json.loads((run_dir / "checkpoints" / "last" / "info.json").read_text())
    k = info["step"]
    assert 1 <= k < STEPS
    assert all(f"interrupted at step {k}/{STEPS}" in err for _, err in results)  # every rank stopped at k
    state = load_train_state(run_dir / "checkpoints" / "last" / "state.pt")
    assert state["step"] == k and state["world_size"] == 2 and len(state["ranks"]) == 2
    assert [s for s, _ in train_losses(run_dir)] == list(range(1, k + 1))
    assert load_run(run_dir, "last").info["step"] == k
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == (
        ["best", "last"] if k >= 25 else ["last"]
    )
    [events] = events_files(run_dir)
    assert events.name.split(".")[-2] == str(procs[0].pid)  # written by rank 0

    # --resume under torchrun with the same 2 processes continues exactly where the uninterrupted run went.
    result = torchrun(where, "--resume")
    assert result.stderr.count("lmzoo: resuming lstm") == 1
    assert train_losses(run_dir) == train_losses(run["ddp"])  # bit-identical per-step losses
    assert val_losses(run_dir) == val_losses(run["ddp"])
    resumed, straight = (
        load_run(run_dir, "last").model.state_dict(),
        load_run(run["ddp"], "last").model.state_dict(),
    )
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    assert len(events_files(run_dir)) == 2 and events in events_files(run_dir)  # one more, from the resume
    assert files_under(where) == expected_files("lstm") | {
        str(e.relative_to(where)) for e in events_files(run_dir)
    }


def test_resuming_with_another_process_count(runs, tmp_path, monkeypatch):
    # Sequential batches: the data order depends on the process count, so 1 process may not resume a 2-process run.
    where = tmp_path / "lstm"
    shutil.copytree(runs["lstm"]["where"], where)
    before = {p: p.read_bytes() for p in where.rglob("*") if p.is_file()}
    monkeypatch.chdir(where)
    result = CliRunner().invoke(app, ["train", "cfg.yaml", "train.max_steps=60", "--resume"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --resume:") and "2 process(es)" in lines[0], (
        result.stderr
    )
    assert {p: p.read_bytes() for p in where.rglob("*") if p.is_file()} == before  # nothing was touched

    # Random windows: a 2-process run may continue in one process.
    where = tmp_path / "gpt"
    shutil.copytree(runs["gpt"]["where"], where)
    raw = deep_merge(
        runs["gpt"]["raw"],
        {
            "out_dir": str(where / "runs"),
            "data": {"train": str(where / "corpus.txt")},
            "train": {"max_steps": STEPS + 2},
        },
    )
    run_dir = train(config_from_dict(raw), resume=True, progress=False)
    assert run_dir == where / "runs" / "gpt"
    assert [s for s, _ in train_losses(run_dir)] == list(range(1, STEPS + 3))
    state = load_train_state(run_dir / "checkpoints" / "last" / "state.pt")
    assert state["step"] == STEPS + 2 and state["world_size"] == 1


# ---- FSDP ----------------------------------------------------------------------------------------------


def test_fsdp_checkpoint_is_read_by_one_process(runs, monkeypatch):
    run = runs["gpt"]
    where = make_launch_dir(run["root"], "gpt_fsdp", deep_merge(run["raw"], {"train": {"strategy": "fsdp"}}))
    run_dir = where / "runs" / "gpt"
    results = finish(launch(where))
    assert [code for code, _ in results] == [0, 0], results[0][1][-2000:]
    # Sharded or replicated, the same global batch gives the same training.
    assert_close_losses(train_losses(run_dir), train_losses(run["single"]))
    assert_close_losses(val_losses(run_dir), val_losses(run["single"]))
    loaded = load_run(run_dir, "last")  # one process, no process group
    assert not dist.is_initialized()
    single = load_run(run["single"], "last")
    assert_close_weights(loaded.model.state_dict(), single.model.state_dict())
    assert load_train_state(run_dir / "checkpoints" / "last" / "state.pt")["world_size"] == 2
    assert files_under(where) == expected_files("gpt") | {
        str(e.relative_to(where)) for e in events_files(run_dir)
    }

    monkeypatch.chdir(where)
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "--run",
            "runs/gpt",
            "--seed",
            "the ",
            "--greedy",
            "--max-new-tokens",
            "12",
            "--checkpoint",
            "last",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    expected = "the " + "".join(
        generate(loaded.model, loaded.tokenizer, "the ", SamplingOptions(max_new_tokens=12, greedy=True))
    )
    assert result.stdout == expected + "\n"


# ---- a dead worker ---------------------------------------------------------------------------------------


def test_a_killed_worker_ends_the_run_quickly(runs):
    where = make_launch_dir(
        runs["lstm"]["root"],
        "lstm_killed",
        deep_merge(runs["lstm"]["raw"], {"train": {"max_steps": 100_000}}),
    )
    procs = launch(where)
    try:
        wait_for_steps(where / "runs" / "lstm", procs, 3)
        procs[1].send_signal(signal.SIGKILL)
        start = time.monotonic()
        code, stderr = finish(procs[:1], timeout=60)[0]
        elapsed = time.monotonic() - start
    finally:
        kill_group(procs)
    assert elapsed < 60
    assert code == 4, stderr[-2000:]  # EXIT_PEER_FAILED
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank 0: another process of this distributed run stopped"), stderr[-2000:]
    assert procs[1].returncode == -signal.SIGKILL


# ---- the corpus: prepared once, mapped by every rank ---------------------------------------------------


def test_torchrun_prepares_the_corpus_once_on_rank_zero(tmp_path):
    raw = deep_merge(config_dict("gpt"), {"train": {"max_steps": 2, "eval_every": 2, "eval_batches": 2}})
    where = make_launch_dir(tmp_path, "big", raw)
    (where / "corpus.txt").write_text(TINY_TEXT * 20_000, encoding="utf-8")  # 21 MB: prepared with a notice
    result = torchrun(where)
    assert result.stderr.count("lmzoo: preparing") == 1 and "rank 0: lmzoo: preparing" in result.stderr
    assert result.stderr.count("lmzoo: prepared ") == 1 and "rank 1: lmzoo: prepar" not in result.stderr
    cache = Path(os.environ["LMZOO_CACHE_DIR"])
    corpus = str(where / "corpus.txt")
    manifests = [
        m
        for m in cache.glob("*/tok-*/manifest.json")
        if json.loads(m.read_text())["sources"]["train"][0]["path"] == corpus
    ]
    assert len(manifests) == 1  # both ranks trained on the same files
