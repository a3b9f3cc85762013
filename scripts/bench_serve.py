"""Load bench for `lmzoo serve` (not a test): concurrent clients against a real server on loopback,
against the same requests decoded one after another in process, in the same run.

    python scripts/bench_serve.py --make-runs /tmp/bench_runs      # gpt, modern, lstm, seq2seq (short training)
    python scripts/bench_serve.py --runs /tmp/bench_runs --models gpt modern lstm seq2seq

For each model, `--clients` concurrent clients send `--requests` completions each (every fourth one
streamed and read to its [DONE]) of `--max-tokens` tokens (`ignore_eos`: every request decodes that
many; seq2seq runs at most their data.max_len), and every response is checked for OpenAI's shape. The
server decodes them in its batched engine (up to 32 sequences per step). Printed per model: requests,
errors, bad shapes, requests/s, tokens/s, p50/p99 latency, the server's peak RSS; beside it the
baseline: the same completions one after another with `Run.generate` in a separate process (its own
peak RSS), no server, which is what serving one request at a time costs at best.

Two more figures explain and check the engine: the cost of one decoding step with 32 sequences
against 1 (in the baseline process), and a client that disconnects mid-stream: how many engine steps
pass between the moment the server notices (its slot count drops) and the last step before, read
from GET /status. Loopback only, bounded in count and time (each request has a timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2

PROMPTS = ["ROMEO:", "The king ", "Wir sind hier.", "O, ", "First Citizen:\n", "Ich habe Hunger."]
CONFIGS = {"gpt": "gpt.yaml", "modern": "modern.yaml", "lstm": "lstm.yaml", "seq2seq": "seq2seq.yaml"}


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    bad_shape: list[str] = field(default_factory=list)


def payload(model: str, client: int, number: int, args: Any) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": PROMPTS[(client + number) % len(PROMPTS)],
        "max_tokens": args.max_tokens,
        "temperature": 0.8,
        "seed": client * 1000 + number,
        "ignore_eos": True,
    }


def check_body(body: dict[str, Any], model: str) -> str | None:
    """What is wrong with a non-streamed response's shape, or None."""
    try:
        choice, usage = body["choices"][0], body["usage"]
        ok = (
            body["object"] == "text_completion"
            and body["model"] == model
            and isinstance(choice["text"], str)
            and choice["finish_reason"] in ("stop", "length")
            and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        )
    except (KeyError, IndexError, TypeError):
        ok = False
    return None if ok else json.dumps(body)[:200]


async def streamed(http: httpx2.AsyncClient, url: str, body: dict[str, Any]) -> tuple[str | None, int]:
    """Read a streamed completion to [DONE]: (what is wrong with it or None, completion tokens)."""
    done, finish, tokens = False, None, 0
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with http.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            return f"status {response.status_code}", 0
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return json.dumps(event)[:200], 0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if event["choices"]:
                finish = event["choices"][0]["finish_reason"] or finish
    ok = done and finish in ("stop", "length")
    return (None if ok else f"stream ended badly (done={done}, finish={finish})"), tokens


async def one_client(
    http: httpx2.AsyncClient, url: str, model: str, client: int, args: Any, tally: Tally
) -> None:
    for number in range(args.requests):
        body = payload(model, client, number, args)
        start = time.perf_counter()
        try:
            if number % 4 == 3:
                problem, tokens = await streamed(http, url, body)
            else:
                response = await http.post(url, json=body)
                if response.status_code != 200:
                    tally.errors.append(f"{response.status_code} {response.text[:200]}")
                    continue
                problem, tokens = (
                    check_body(response.json(), model),
                    response.json()["usage"]["completion_tokens"],
                )
        except httpx2.HTTPError as err:
            tally.errors.append(f"{type(err).__name__}: {err}")
            continue
        tally.latencies.append(time.perf_counter() - start)
        tally.tokens += tokens
        if problem is not None:
            tally.bad_shape.append(problem)


async def bench_model(base: str, model: str, args: Any) -> dict[str, Any]:
    tally = Tally()
    limits = httpx2.Limits(max_connections=args.clients + 4)
    url = f"{base}/v1/completions"
    async with httpx2.AsyncClient(timeout=args.timeout, limits=limits) as http:
        warm = await http.post(url, json={"model": model, "prompt": "a", "max_tokens": 1})
        warm.raise_for_status()  # the model loads before the clock starts
        start = time.perf_counter()
        await asyncio.gather(*(one_client(http, url, model, c, args, tally) for c in range(args.clients)))
        wall = time.perf_counter() - start
        disconnect = await disconnect_check(http, base, model)
    ordered = sorted(tally.latencies) or [float("nan")]
    return {
        "model": model,
        "requests": args.clients * args.requests,
        "errors": len(tally.errors),
        "bad_shape": len(tally.bad_shape),
        "req_per_s": args.clients * args.requests / wall,
        "tokens_per_s": tally.tokens / wall,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "first_problems": (tally.errors + tally.bad_shape)[:3],
        **disconnect,
    }


async def disconnect_check(http: httpx2.AsyncClient, base: str, model: str) -> dict[str, Any]:
    """A stream of 100,000 tokens dropped after 5 events: engine steps taken after the server freed
    the slot minus those taken while the client was already gone, as GET /status reports them."""
    body = {"model": model, "prompt": "a", "max_tokens": 100_000, "ignore_eos": True, "stream": True}
    async with http.stream("POST", f"{base}/v1/completions", json=body) as response:
        events = 0
        async for line in response.aiter_lines():
            events += line.startswith("data: ")
            if events == 5:
                break
        closed_at = (await http.get(f"{base}/status")).json()["runs"][model]["steps"]
    start = time.perf_counter()
    while True:
        state = (await http.get(f"{base}/status")).json()["runs"][model]
        if state["active"] == 0 or time.perf_counter() - start > 10:
            return {
                "freed_after_steps": state["steps"] - closed_at,
                "freed_ms": 1000 * (time.perf_counter() - start),
            }
        await asyncio.sleep(0.001)


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident set (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def baseline(args: Any, model: str) -> dict[str, float]:
    """The sequential baseline and the step costs, in a process of their own (its peak RSS is its own)."""
    command = [sys.executable, __file__, "--baseline-of", model, "--runs", args.runs, "--device", args.device]
    command += ["--max-tokens", str(args.max_tokens), "--baseline-requests", str(args.baseline_requests)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_baseline(args: Any) -> None:
    """Print, as one JSON line: sequential requests/s, tokens/s, p50/p99, peak RSS; step costs."""
    from concurrent.futures import ThreadPoolExecutor

    from lmzoo.run import Run

    run = Run.open(os.path.join(args.runs, args.baseline_of))
    settings = dict(max_new_tokens=args.max_tokens, temperature=0.8, ignore_eos=True, device=args.device)

    def sequential() -> dict[str, float]:
        "".join(run.generate("a", **{**settings, "max_new_tokens": 1}))  # load the model first
        latencies, tokens = [], 0
        start = time.perf_counter()
        for number in range(args.baseline_requests):
            begin = time.perf_counter()
            decoding = run.decode(PROMPTS[number % len(PROMPTS)], seed=number, **settings)
            "".join(step.text for step in decoding)
            tokens += decoding.completion_tokens
            latencies.append(time.perf_counter() - begin)
        wall, ordered = time.perf_counter() - start, sorted(latencies)
        return {
            "req_per_s": len(latencies) / wall,
            "tokens_per_s": tokens / wall,
            "p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        }

    with ThreadPoolExecutor(1) as pool:  # a worker thread, as the server decodes in
        found = pool.submit(sequential).result()
        found.update(pool.submit(step_costs, run, args).result())
    found["peak_rss_mb"] = peak_rss_mb(os.getpid())
    print(json.dumps(found))


def step_costs(run: Any, args: Any) -> dict[str, float]:
    """Milliseconds of one engine step (every active row advanced by a token) with 1 and 32 rows."""
    from lmzoo.inference.engine import Engine, Request

    options = run.sampling(max_new_tokens=10_000, temperature=0.8, ignore_eos=True)
    costs = {}
    for rows in (1, 32):
        engine = Engine(run.load("best", args.device), slots=rows)
        made = engine.submit_all([Request(PROMPTS[i % len(PROMPTS)], options, seed=i) for i in range(rows)])
        for _ in range(3):
            engine.step()  # prefill and warm up
        start = time.perf_counter()
        for _ in range(20):
            engine.step()
        costs[f"step_ms_{rows}"] = 1000 * (time.perf_counter() - start) / 20
        for generation in made:
            generation.cancel()
        engine.run()
    return costs


def make_runs(folder: str, steps: int) -> None:
    """Train the four bench models briefly (their speed does not depend on how well they are trained)."""
    from lmzoo.run import load_config
    from lmzoo.training.loop import train

    configs = Path(__file__).resolve().parent.parent / "configs"
    for name, file in CONFIGS.items():
        overrides = [
            f"name={name}",
            f"out_dir={folder}",
            f"train.max_steps={steps}",
            f"train.eval_every={steps}",
        ]
        overrides += ["train.eval_batches=2", "train.bleu_sentences=20"] if name == "seq2seq" else []
        train(load_config(configs / file, overrides), progress=False)


def start_server(args: Any) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "lmzoo", "serve", "--runs", args.runs, "--port", str(port)]
    command += ["--device", args.device, "--cache-size", str(len(args.models))]
    command += ["--limit", f"max_tokens={100_000}", "--limit", "timeout_s=300"]
    process = subprocess.Popen(command)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            httpx2.get(f"{base}/v1/models", timeout=2)
            return process, base
        except httpx2.TransportError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit("the server did not start within 120 s")


def report(rows: list[dict[str, Any]], bases: dict[str, dict[str, float]], args: Any) -> None:
    print(
        f"\n{platform.node()} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d')}: {args.clients} clients x ",
        end="",
    )
    print(f"{args.requests} requests of {args.max_tokens} tokens (ignore_eos), every 4th streamed, ", end="")
    print(f"{args.threads} torch thread(s); baseline: {args.baseline_requests} requests one after another\n")
    print("| model | errors | req/s | tokens/s | p50 ms | p99 ms | peak RSS MB | baseline req/s | baseline tokens/s "
          "| baseline p50 / p99 ms | baseline RSS MB | tokens/s ratio | step ms, 1 / 32 rows |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        b = bases[row["model"]]
        print(
            f"| {row['model']} | {row['errors'] + row['bad_shape']} | {row['req_per_s']:.1f} "
            f"| {row['tokens_per_s']:.0f} "
            f"| {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['server_rss_mb']:.0f} | {b['req_per_s']:.1f} "
            f"| {b['tokens_per_s']:.0f} | {b['p50_ms']:.0f} / {b['p99_ms']:.0f} | {b['peak_rss_mb']:.0f} "
            f"| {row['tokens_per_s'] / b['tokens_per_s']:.1f}x | {b['step_ms_1']:.2f} / {b['step_ms_32']:.2f} |"
        )
    for row in rows:
        print(f"{row['model']}: a client gone mid-stream: its slot freed {row['freed_ms']:.0f} ms after it "
              f"closed, {row['freed_after_steps']} engine step(s) later")  # fmt: skip
        for problem in row["first_problems"]:
            print(f"  {row['model']}: {problem}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", help="runs folder to serve (starts `lmzoo serve` on a free loopback port)")
    parser.add_argument("--make-runs", help="train the bench's four runs into this folder, then exit")
    parser.add_argument("--steps", type=int, default=30, help="--make-runs: training steps per run")
    parser.add_argument("--models", nargs="+", default=list(CONFIGS))
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=20, help="per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--baseline-requests", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, server and baseline alike")
    parser.add_argument("--baseline-of", help=argparse.SUPPRESS)  # the baseline's own process
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch loads, here and in the child processes
    if args.make_runs:
        make_runs(args.make_runs, args.steps)
        return
    if not args.runs:
        parser.error("give --runs (or --make-runs)")
    if args.baseline_of:
        run_baseline(args)
        return
    process, base = start_server(args)
    try:
        rows = []
        for model in args.models:
            rows.append(asyncio.run(bench_model(base, model, args)))
            rows[-1]["server_rss_mb"] = peak_rss_mb(process.pid)  # peak so far: the models loaded until now
    finally:
        process.terminate()
        process.wait(timeout=30)
    report(rows, {model: baseline(args, model) for model in args.models}, args)


if __name__ == "__main__":
    main()
