"""Load bench for `lmzoo serve` (not a test): concurrent clients against a real server on loopback.

    python scripts/bench_serve.py --runs /tmp/bench_runs --models gpt lstm seq2seq
    python scripts/bench_serve.py --url http://127.0.0.1:8000 --models gpt   # a server already running

For each model, `--clients` concurrent clients send `--requests` completions each (every fourth one
streamed and read to its [DONE]); every response is checked for OpenAI's shape. Prints one Markdown
row per model: requests, errors, bad shapes, p50/p99 latency, requests/s. The baseline, measured in
the same run: the same completions made one after another in this process with `Run.generate` (in a
worker thread, as the server runs them), no server. A model decodes one request at a time, so the
baseline's requests/s is the ceiling the server's can approach. Loopback only, bounded in count and
time (each request has a timeout).
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
from typing import Any

import httpx2

PROMPTS = ["ROMEO:", "The king ", "Wir sind hier.", "O, ", "First Citizen:\n", "Ich habe Hunger."]


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    bad_shape: list[str] = field(default_factory=list)


def check_body(body: dict[str, Any], model: str) -> str | None:
    """What is wrong with a non-streamed response's shape, or None."""
    try:
        choice = body["choices"][0]
        usage = body["usage"]
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


async def streamed(http: httpx2.AsyncClient, url: str, payload: dict[str, Any]) -> str | None:
    """Read a streamed completion to [DONE]; what is wrong with it, or None."""
    done, finish = False, None
    async with http.stream("POST", url, json={**payload, "stream": True}) as response:
        if response.status_code != 200:
            return f"status {response.status_code}"
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return json.dumps(event)[:200]
            finish = event["choices"][0]["finish_reason"] or finish
    return (
        None
        if done and finish in ("stop", "length")
        else f"stream ended badly (done={done}, finish={finish})"
    )


async def one_client(
    http: httpx2.AsyncClient, url: str, model: str, client: int, args: Any, tally: Tally
) -> None:
    for number in range(args.requests):
        payload = {
            "model": model,
            "prompt": PROMPTS[(client + number) % len(PROMPTS)],
            "max_tokens": args.max_tokens,
            "temperature": 0.8,
            "seed": client * 1000 + number,
        }
        start = time.perf_counter()
        try:
            if number % 4 == 3:
                problem = await streamed(http, url, payload)
            else:
                response = await http.post(url, json=payload)
                if response.status_code != 200:
                    tally.errors.append(f"{response.status_code} {response.text[:200]}")
                    continue
                problem = check_body(response.json(), model)
        except httpx2.HTTPError as err:
            tally.errors.append(f"{type(err).__name__}: {err}")
            continue
        tally.latencies.append(time.perf_counter() - start)
        if problem is not None:
            tally.bad_shape.append(problem)


async def bench_model(base: str, model: str, args: Any, headers: dict[str, str]) -> dict[str, Any]:
    tally = Tally()
    limits = httpx2.Limits(max_connections=args.clients + 4)
    async with httpx2.AsyncClient(timeout=args.timeout, limits=limits, headers=headers) as http:
        warm = await http.post(
            f"{base}/v1/completions", json={"model": model, "prompt": "a", "max_tokens": 1}
        )
        warm.raise_for_status()  # the model loads before the clock starts
        start = time.perf_counter()
        url = f"{base}/v1/completions"
        await asyncio.gather(*(one_client(http, url, model, c, args, tally) for c in range(args.clients)))
        wall = time.perf_counter() - start
    total = args.clients * args.requests
    ordered = sorted(tally.latencies) or [float("nan")]
    return {
        "model": model,
        "requests": total,
        "errors": len(tally.errors),
        "bad_shape": len(tally.bad_shape),
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "req_per_s": total / wall,
        "wall_s": wall,
        "first_problems": (tally.errors + tally.bad_shape)[:3],
    }


def baseline(args: Any, model: str, count: int = 40) -> dict[str, float]:
    """Sequential in-process `Run.generate` with the bench's prompts and settings: latency and requests/s."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(
        1
    ) as pool:  # a worker thread, as the server decodes in (torch threads differ there)
        return pool.submit(_sequential, args, model, count).result()


def _sequential(args: Any, model: str, count: int) -> dict[str, float]:
    from lmzoo.run import Run

    run = Run.open(os.path.join(args.runs, model))
    settings = dict(max_new_tokens=args.max_tokens, temperature=0.8, device=args.device)
    "".join(run.generate("a", **{**settings, "max_new_tokens": 1}))  # load the model first
    latencies = []
    start = time.perf_counter()
    for number in range(count):
        begin = time.perf_counter()
        "".join(run.generate(PROMPTS[number % len(PROMPTS)], seed=number, **settings))
        latencies.append(time.perf_counter() - begin)
    return {"p50_ms": 1000 * statistics.median(latencies), "req_per_s": count / (time.perf_counter() - start)}


def start_server(args: Any) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "lmzoo", "serve", "--runs", args.runs, "--port", str(port)]
    command += ["--device", args.device, "--cache-size", str(len(args.models))]
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", help="runs folder to serve (starts `lmzoo serve` on a free loopback port)")
    parser.add_argument("--url", help="an already running server instead (loopback)")
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=20, help="per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--api-key", default=os.environ.get("LMZOO_API_KEY"))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads, server and baseline alike (OMP_NUM_THREADS)",
    )
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch loads, here and in the server process
    if not (args.runs or args.url):
        parser.error("give --runs or --url")
    process, base = start_server(args) if args.url is None else (None, args.url.rstrip("/"))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        rows = [asyncio.run(bench_model(base, model, args, headers)) for model in args.models]
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
    base_rows = {model: baseline(args, model) for model in args.models} if args.runs else {}
    print(
        f"\n{platform.node()} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d')}, {args.clients} clients x ",
        end="",
    )
    print(f"{args.requests} requests, max_tokens {args.max_tokens}, every 4th request streamed, ", end="")
    print(f"{args.threads} torch thread(s)\n")
    print(
        "| model | requests | errors | bad shape | p50 ms | p99 ms | requests/s | baseline: requests/s, p50 ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        base_row = base_rows.get(row["model"])
        shown = f"{base_row['req_per_s']:.1f}, {base_row['p50_ms']:.0f}" if base_row else "-"
        print(
            f"| {row['model']} | {row['requests']} | {row['errors']} | {row['bad_shape']} | "
            f"{row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['req_per_s']:.1f} | {shown} |"
        )
        for problem in row["first_problems"]:
            print(f"  {row['model']}: {problem}")


if __name__ == "__main__":
    main()
