"""Real clients, not our own: the official `openai` client against uvicorn on 127.0.0.1, the `mcp` SDK's
client in memory, over streamable HTTP and launching `lmzoo serve --mcp-stdio`; faults: a client that
leaves mid-stream, SIGTERM during a stream."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("mcp")
openai = pytest.importorskip("openai")

import anyio  # noqa: E402
import httpx2  # noqa: E402
from serve_runs import free_port, serve_root, serving  # noqa: E402

from lmzoo.run import Run  # noqa: E402
from lmzoo.serve import Limits, create_app  # noqa: E402

KEY = "test-key"
TEXT = "the cat sat on the mat."


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return serve_root(tmp_path_factory)


@pytest.fixture(scope="module")
def server(root) -> Iterator[str]:
    """uvicorn in a thread on a free loopback port, with an API key; yields the base URL."""
    limits = Limits(timeout_s=30, max_tokens=100_000)
    with serving(create_app(root / "runs", api_key=KEY, device="cpu", limits=limits)) as url:
        yield url


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60) as api:
        yield api


def test_openai_client_lists_models_and_completes(client, root):
    assert sorted(m.id for m in client.models.list()) == ["gpt", "lstm", "translate"]
    expected = "".join(
        Run.open(root / "runs" / "gpt").generate("the ", greedy=True, max_new_tokens=10, device="cpu")
    )
    result = client.completions.create(model="gpt", prompt="the ", max_tokens=10, temperature=0)
    assert result.choices[0].text == expected and result.usage.completion_tokens == 10


def test_openai_client_echo_logprobs_match_lmzoo_score(client, root):
    result = client.completions.create(model="gpt", prompt=TEXT, max_tokens=0, echo=True, logprobs=2)
    logprobs = result.choices[0].logprobs
    assert logprobs.tokens == list(TEXT) and logprobs.token_logprobs[0] is None
    for token, top in zip(logprobs.tokens[1:], logprobs.top_logprobs[1:], strict=True):
        assert len(top) in (2, 3) and token in top  # the 2 most likely, and the token itself
    scored = Run.open(root / "runs" / "gpt").score(TEXT, device="cpu")
    assert sum(logprobs.token_logprobs[1:]) == pytest.approx(scored.total_logprob, abs=1e-4)


def test_openai_client_streaming_concatenates_to_the_whole(client):
    fields = dict(model="lstm", prompt="the ", max_tokens=24, temperature=1.0, seed=11)
    whole = client.completions.create(**fields).choices[0].text
    pieces = [
        chunk.choices[0].text for chunk in client.completions.create(**fields, stream=True) if chunk.choices
    ]
    assert len(pieces) > 3 and "".join(pieces) == whole


def test_openai_client_sees_openai_errors(client, server):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="the")
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="lstm", prompt="the", max_tokens=-3)
    assert caught.value.body["param"] == "max_tokens"
    with openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0) as other:
        with pytest.raises(openai.AuthenticationError):
            other.models.list()
    assert client.completions.create(model="lstm", prompt="the", max_tokens=2).choices[0].text


def test_a_client_leaving_mid_stream_frees_its_slot(server):
    """A stream of 50,000 tokens (about a minute) is dropped after two events: the run's engine has no
    sequence decoding within a second (GET /status), and the next request on it answers."""
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "lstm", "prompt": "the ", "max_tokens": 50_000, "stream": True, "ignore_eos": True}
    with httpx2.Client(timeout=30, headers=headers) as http:

        def active() -> int:
            return http.get(f"{server}/status").json()["runs"]["lstm"]["active"]

        with http.stream("POST", f"{server}/v1/completions", json=body) as response:
            lines, events = response.iter_lines(), 0  # held: a dropped line iterator closes the connection
            for line in lines:
                events += line.startswith("data: ")
                if events == 2:
                    break
            assert active() == 1  # decoding while the client reads
        # leaving the block closes the connection: the client is gone
        start = time.monotonic()
        while active():
            assert time.monotonic() - start < 1, "the abandoned stream still holds its slot"
            time.sleep(0.01)
        after = http.post(
            f"{server}/v1/completions", json={"model": "lstm", "prompt": "the", "max_tokens": 3}
        )
    assert after.status_code == 200


def test_a_client_leaving_a_non_streamed_request_frees_its_slot(root):
    """A non-streamed request for 100,000 tokens (minutes of work; the server's timeout is 60 s) whose
    client closes its socket while it decodes: its slot is free again within seconds, and the next
    request on the run answers at once."""
    app = create_app(root / "runs", device="cpu", limits=Limits(timeout_s=60, max_tokens=100_000))
    registry = app.state.registry

    def decoding() -> bool:  # a sequence decoding in the run's engine
        return any(engine.active for engine in registry.engines().values())

    def wait_for(condition, seconds: float) -> float:
        start = time.monotonic()
        while not condition():
            assert time.monotonic() - start < seconds
            time.sleep(0.02)
        return time.monotonic() - start

    with serving(app) as url:
        port = int(url.rsplit(":", 1)[1])
        body = b'{"model": "lstm", "prompt": "the ", "max_tokens": 100000, "ignore_eos": true}'
        head = (
            "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(head.encode() + body)
            wait_for(decoding, 30)  # generating (loading the run takes a moment on a cold machine)
            time.sleep(0.3)
            assert decoding()
        assert wait_for(lambda: not decoding(), 10) < 5
        with httpx2.Client(timeout=30) as http:
            start = time.monotonic()
            after = http.post(
                f"{url}/v1/completions", json={"model": "lstm", "prompt": "the", "max_tokens": 3}
            )
            assert after.status_code == 200 and time.monotonic() - start < 10


# ---- MCP -----------------------------------------------------------------------------------------


def _text_of(result) -> str:
    return result.content[0].text


def test_mcp_in_memory_lists_tools_and_scores_and_generates(root):
    from mcp import Client

    from lmzoo.serve.mcp import build_mcp_server
    from lmzoo.serve.runs import RunRegistry

    registry = RunRegistry(root / "runs", limits=Limits(), device="cpu")
    run = Run.open(root / "runs" / "gpt")

    async def main() -> None:
        async with Client(build_mcp_server(registry)) as mcp:
            tools = {tool.name: tool for tool in (await mcp.list_tools()).tools}
            assert set(tools) == {
                "list_runs",
                "describe_run",
                "generate",
                "score",
                "next_tokens",
                "translate",
            }
            assert all(tool.annotations.read_only_hint for tool in tools.values())
            assert tools["score"].input_schema["required"] == ["run", "text"]
            scored = (
                await mcp.call_tool("score", {"run": "gpt", "text": TEXT, "per_token": True})
            ).structured_content
            expected = run.score(TEXT, device="cpu")
            assert scored["loss"] == pytest.approx(expected.loss) and scored["tokens"] == len(TEXT) - 1
            assert scored["bits_per_char"] == pytest.approx(expected.bits_per_char)
            assert [t["token"] for t in scored["per_token"]] == list(TEXT[1:])
            made = await mcp.call_tool(
                "generate", {"run": "gpt", "prompt": "the ", "max_tokens": 9, "temperature": 0}
            )
            greedy = "".join(run.generate("the ", greedy=True, max_new_tokens=9, device="cpu"))
            assert made.structured_content["text"] == greedy
            top = (
                await mcp.call_tool("next_tokens", {"run": "gpt", "prefix": "the ", "k": 4})
            ).structured_content
            values = [t["logprob"] for t in top["result"]]
            assert values == sorted(values, reverse=True) and top["result"][0]["token"] == greedy[0]
            runs = (await mcp.call_tool("list_runs", {})).structured_content["result"]
            assert {r["name"]: r["family"] for r in runs} == {
                "gpt": "gpt",
                "lstm": "lstm",
                "translate": "transformer",
            }
            assert all(r["parameters"] > 0 for r in runs)
            translated = await mcp.call_tool("translate", {"run": "translate", "text": "the cat", "beam": 2})
            assert not translated.is_error
            missing = await mcp.call_tool("score", {"run": "../outside/secret", "text": TEXT})
            assert missing.is_error and "not a run name" in _text_of(missing)
            config = await mcp.read_resource("lmzoo://runs/gpt/config")
            assert "name: gpt" in config.contents[0].text

    try:
        anyio.run(main)
    finally:
        registry.close()


def test_mcp_retrieve_searches_the_passage_index_it_was_given(root, tmp_path):
    pytest.importorskip("bm25s")
    from mcp import Client

    from lmzoo.retrieval.bm25 import Bm25Index
    from lmzoo.serve.mcp import build_mcp_server
    from lmzoo.serve.runs import RunRegistry

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "cats.txt").write_text("the cat sat on the mat.\n", encoding="utf-8")
    (tmp_path / "docs" / "birds.txt").write_text("a bird sang in the tree.\n", encoding="utf-8")
    Bm25Index.build(tmp_path / "docs", tmp_path / "index")
    registry = RunRegistry(root / "runs", limits=Limits(), device="cpu")

    async def main() -> None:
        async with Client(build_mcp_server(registry, rag_index=tmp_path / "index")) as mcp:
            found = (await mcp.call_tool("retrieve", {"query": "bird tree", "k": 1})).structured_content[
                "result"
            ]
            assert [hit["source"] for hit in found] == ["birds.txt:1-1"] and found[0]["score"] > 0

    try:
        anyio.run(main)
    finally:
        registry.close()


def test_mcp_over_http_needs_the_key(server):
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async def main() -> None:
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as http:
            async with Client(streamable_http_client(f"{server}/mcp", http_client=http)) as mcp:
                result = await mcp.call_tool("score", {"run": "lstm", "text": "the cat "})
                assert result.structured_content["tokens"] == 7

    anyio.run(main)


def test_mcp_stdio_subprocess_scores_and_generates(root):
    from mcp import Client, StdioServerParameters

    command = [sys.executable, "-m", "lmzoo", "serve", "--runs", str(root / "runs"), "--mcp-stdio"]
    params = StdioServerParameters(command=command[0], args=[*command[1:], "--device", "cpu"])
    lstm = Run.open(root / "runs" / "lstm")
    expected = lstm.score("the cat ", device="cpu")
    # greedy, so the text is known: a sampled one may hold a special token that decodes to no text
    greedy = "".join(lstm.generate("the", greedy=True, max_new_tokens=5, device="cpu"))

    async def main() -> None:
        async with Client(params, read_timeout_seconds=60) as mcp:
            names = {tool.name for tool in (await mcp.list_tools()).tools}
            assert {"score", "generate"} <= names
            scored = await mcp.call_tool("score", {"run": "lstm", "text": "the cat "})
            assert scored.structured_content["total_logprob"] == pytest.approx(
                expected.total_logprob, abs=1e-4
            )
            made = await mcp.call_tool(
                "generate", {"run": "lstm", "prompt": "the", "max_tokens": 5, "temperature": 0}
            )
            assert (
                made.structured_content["text"] == greedy
                and made.structured_content["finish_reason"] == "length"
            )

    anyio.run(main)


# ---- SIGTERM during a stream: the process exits 0 -----------------------------------------------


def test_sigterm_during_a_stream_exits_cleanly(root):
    port = free_port()
    command = [sys.executable, "-m", "lmzoo", "serve", "--runs", str(root / "runs"), "--port", str(port)]
    command += ["--device", "cpu", "--limit", "max_tokens=100000", "--limit", "shutdown_grace_s=1"]
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    lines: list[str] = []
    try:
        with httpx2.Client(timeout=30) as http:
            deadline = time.monotonic() + 60
            while True:
                assert process.poll() is None and time.monotonic() < deadline, "server did not start"
                try:
                    http.get(f"http://127.0.0.1:{port}/v1/models")
                    break
                except httpx2.TransportError:
                    time.sleep(0.2)
            body = {
                "model": "lstm",
                "prompt": "the ",
                "max_tokens": 100_000,
                "stream": True,
                "ignore_eos": True,
            }
            with http.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body) as response:
                for line in response.iter_lines():
                    lines.append(line)
                    if len(lines) == 4:
                        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        stderr = process.stderr.read() if process.stderr else ""
    events = [line for line in lines if line]
    assert "shutting down" in events[-2] and events[-1] == "data: [DONE]", events[
        -3:
    ]  # cut with an error event
    assert "Traceback" not in stderr and "limits max_body_bytes=" in stderr
