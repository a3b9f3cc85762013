"""One inference core: every path that writes text ends at the same place for a stop string, and every path
that scores text (echo logprobs, `lmzoo score`, `lmzoo eval`) gives the same numbers, on texts longer than
the model's window too."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import TINY_TEXT
from typer.testing import CliRunner

pytest.importorskip("mcp")
pytest.importorskip("starlette")

import anyio  # noqa: E402
from serve_runs import serve_root  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from lmzoo.cli import app  # noqa: E402
from lmzoo.run import Run  # noqa: E402
from lmzoo.serve import Limits, create_app  # noqa: E402

PROMPT = "the "
MAX_TOKENS = 80
LOCAL = "http://127.0.0.1"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return serve_root(tmp_path_factory)


def stop_of_length(text: str, length: int) -> str:
    """A piece of `text` (char tokens: `length` tokens) whose first occurrence is not at its start, so the
    cut text is not empty, and that begins well inside the text."""
    for start in range(len(text) // 3, len(text) - length):
        stop = text[start : start + length]
        if text.find(stop) > 0 and stop.strip():
            return stop
    raise AssertionError(f"no stop string of {length} characters in {text!r}")


def through_every_path(root: Path, stop: str) -> dict[str, str]:
    """The greedy continuation of PROMPT with `stop`, through each way lmzoo writes text."""
    run_dir = root / "runs" / "gpt"
    texts = {}
    run = Run.open(run_dir)
    texts["Run.generate"] = "".join(
        run.generate(PROMPT, greedy=True, max_new_tokens=MAX_TOKENS, stop=[stop], device="cpu")
    )
    base = [
        "generate",
        "--run",
        str(run_dir),
        "--seed",
        PROMPT,
        "--greedy",
        "--stop",
        stop,
        "--device",
        "cpu",
    ]
    base += ["--max-new-tokens", str(MAX_TOKENS)]
    plain = CliRunner().invoke(app, base)
    assert plain.exit_code == 0, plain.output
    texts["lmzoo generate"] = plain.stdout.removeprefix(PROMPT).removesuffix("\n")
    probs = CliRunner().invoke(app, [*base, "--show-probs", "--json"])
    assert probs.exit_code == 0, probs.output
    texts["lmzoo generate --show-probs --json"] = json.loads(probs.stdout)["text"]
    body = {"model": "gpt", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stop": [stop]}
    with TestClient(create_app(root / "runs", device="cpu"), base_url=LOCAL) as client:
        answer = client.post("/v1/completions", json=body).json()
        assert answer["choices"][0]["finish_reason"] == "stop", answer
        texts["/v1/completions"] = answer["choices"][0]["text"]
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: {")]
        texts["/v1/completions stream"] = "".join(json.loads(e)["choices"][0]["text"] for e in events)
    texts["MCP generate"] = anyio.run(_mcp_generate, root, stop)
    return texts


async def _mcp_generate(root: Path, stop: str) -> str:
    from mcp import Client

    from lmzoo.serve.mcp import build_mcp_server
    from lmzoo.serve.runs import RunRegistry

    registry = RunRegistry(root / "runs", limits=Limits(), device="cpu")
    arguments = {"run": "gpt", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stop": [stop]}
    async with Client(build_mcp_server(registry)) as mcp:
        made = await mcp.call_tool("generate", arguments)
    assert made.structured_content["finish_reason"] == "stop"
    return made.structured_content["text"]


@pytest.mark.parametrize("length", [1, 3, 10])
def test_a_stop_string_ends_every_path_at_the_same_place(root, length):
    run = Run.open(root / "runs" / "gpt")
    free = "".join(
        run.generate(PROMPT, greedy=True, max_new_tokens=MAX_TOKENS, ignore_eos=True, device="cpu")
    )
    assert len(free) == MAX_TOKENS  # a char run: one character per token
    stop = stop_of_length(free, length)
    expected = free[: free.find(stop)]
    texts = through_every_path(root, stop)
    assert texts == dict.fromkeys(texts, expected), (stop, expected)


# ---- one scorer ------------------------------------------------------------------------------------------

LONG_TEXT = TINY_TEXT[:110]  # more than three windows of the gpt run (32) and of the lstm run (8)


@pytest.mark.parametrize("name", ["gpt", "lstm"])
def test_echo_logprobs_equal_score_equal_eval_on_a_text_three_windows_long(root, tmp_path, name):
    run = Run.open(root / "runs" / name)
    assert len(run.tokenizer.encode(LONG_TEXT)) > 3 * run.config.seq_len
    scored = run.score(LONG_TEXT, device="cpu", top_k=0)
    body = {"model": name, "prompt": LONG_TEXT, "max_tokens": 0, "echo": True, "logprobs": 0}
    with TestClient(create_app(root / "runs", device="cpu"), base_url=LOCAL) as client:
        echoed = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]["token_logprobs"]
    assert echoed[0] is None and len(echoed) == len(scored.tokens) + 1
    assert echoed[1:] == pytest.approx([t.logprob for t in scored.tokens], abs=1e-5)
    data = tmp_path / "text.txt"
    data.write_text(LONG_TEXT, encoding="utf-8")
    evaluated = run.evaluate(data, device="cpu")
    assert evaluated["tokens"] == len(scored.tokens)
    assert evaluated["loss"] == pytest.approx(scored.loss, abs=1e-5)
    printed = CliRunner().invoke(app, ["eval", "--run", str(root / "runs" / name), "--data", str(data)])
    assert (
        f"loss {scored.loss:.4f}" in printed.stdout and f"ppl {math.exp(scored.loss):.2f}" in printed.stdout
    )
