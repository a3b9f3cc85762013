"""The OpenAI-compatible API in process (starlette's TestClient): values against the library's own
numbers, every kind of bad request, runs that vanish or point outside --runs, keys, limits."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("mcp")

from serve_runs import copy_runs, serve_root  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from lmzoo.inference.engine import Request  # noqa: E402
from lmzoo.inference.sampling import SamplingOptions  # noqa: E402
from lmzoo.run import Run  # noqa: E402
from lmzoo.serve import Limits, create_app  # noqa: E402

LOCAL = "http://127.0.0.1"
TEXT = "the cat sat on the mat."  # 23 characters: within one window of the GPT (seq_len 32)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return serve_root(tmp_path_factory)


@pytest.fixture(scope="module")
def client(root):
    app = create_app(root / "runs", device="cpu", limits=Limits(timeout_s=30))
    with TestClient(app, base_url=LOCAL) as test_client:
        yield test_client


def complete(client, **fields):
    return client.post("/v1/completions", json=fields)


def assert_openai_error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_models_lists_the_runs_with_a_checkpoint(client, root):
    (root / "runs" / "empty-dir").mkdir(exist_ok=True)  # no checkpoint: not a model
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["gpt", "lstm", "translate"]
    assert client.get("/v1/models/gpt").json()["id"] == "gpt"
    assert_openai_error(client.get("/v1/models/nope"), 404, "model")


@pytest.mark.parametrize("name", ["gpt", "lstm"])
def test_greedy_completion_equals_run_generate(client, root, name):
    expected = "".join(
        Run.open(root / "runs" / name).generate("the ", greedy=True, max_new_tokens=12, device="cpu")
    )
    body = complete(client, model=name, prompt="the ", max_tokens=12, temperature=0).json()
    assert body["choices"][0]["text"] == expected
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 12, "total_tokens": 16}


@pytest.mark.parametrize(("name", "text"), [("gpt", TEXT), ("lstm", "the cat ")])  # lstm: seq_len 8
def test_echo_logprobs_total_equals_lmzoo_score(client, root, tmp_path, name, text):
    """max_tokens 0 + echo + logprobs scores the prompt's tokens: the first has no context (null), every
    other one is scored given all tokens before it, as `lmzoo score` does for a text of at most
    seq_len + 1 tokens, and as `lmzoo eval` does on a file holding the text."""
    body = complete(client, model=name, prompt=text, max_tokens=0, echo=True, logprobs=3).json()
    choice = body["choices"][0]
    assert choice["text"] == text
    block = choice["logprobs"]
    assert "".join(block["tokens"]) == text and block["token_logprobs"][0] is None
    assert block["text_offset"] == list(range(len(text)))  # characters: one per token
    api_total = sum(block["token_logprobs"][1:])
    run = Run.open(root / "runs" / name)
    scored = run.score(text, device="cpu")
    assert len(scored.tokens) == len(text) - 1
    assert api_total == pytest.approx(scored.total_logprob, abs=1e-4)
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    evaluated = run.evaluate(data=tmp_path / "text.txt", device="cpu")
    assert api_total == pytest.approx(-evaluated["loss"] * evaluated["tokens"], abs=1e-3)
    entries = zip(block["tokens"][1:], block["top_logprobs"][1:], block["token_logprobs"][1:], strict=True)
    for token, top, logprob in entries:  # the 3 most likely, and the token itself (as OpenAI's)
        assert len(top) in (3, 4) and top[token] == logprob and max(top.values()) >= logprob
        assert len(top) == 3 or min(top.values()) == logprob


def test_echo_of_a_long_prompt_keeps_left_context(client, root):
    """Past the GPT's 32-token window the prompt is read in windows sliding by half: every token but
    the first is scored, and the first window's tokens are exactly `lmzoo score` of that window."""
    text = "the dog ate the bone. a bird sang in the tree. the cat sat on the mat."
    block = complete(client, model="gpt", prompt=text, max_tokens=0, echo=True, logprobs=0).json()["choices"][
        0
    ]["logprobs"]
    values = block["token_logprobs"]
    assert len(values) == len(text) and values[0] is None and all(math.isfinite(v) for v in values[1:])
    window = Run.open(root / "runs" / "gpt").score(text[:32], device="cpu")
    assert values[1:32] == pytest.approx([t.logprob for t in window.tokens], abs=1e-4)


def test_generated_logprobs_are_the_choosing_steps(client):
    """Greedy: each generated token is its step's most likely one, and its logprob is what scoring the
    whole text with echo gives that position."""
    body = complete(client, model="gpt", prompt="the ", max_tokens=8, temperature=0, logprobs=2).json()
    choice = body["choices"][0]
    block = choice["logprobs"]
    assert "".join(block["tokens"]) == choice["text"] and block["text_offset"][0] == len("the ")
    for token, logprob, top in zip(
        block["tokens"], block["token_logprobs"], block["top_logprobs"], strict=True
    ):
        assert top[token] == pytest.approx(logprob) and logprob == pytest.approx(max(top.values()))
    echoed = complete(
        client, model="gpt", prompt="the " + choice["text"], max_tokens=0, echo=True, logprobs=0
    )
    assert echoed.json()["choices"][0]["logprobs"]["token_logprobs"][4:] == pytest.approx(
        block["token_logprobs"], abs=1e-4
    )


def _stream(client, **fields) -> tuple[list[dict], list[str]]:
    events, raw = [], []
    with client.stream("POST", "/v1/completions", json={**fields, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                raw.append(line[6:])
                if line[6:] != "[DONE]":
                    events.append(json.loads(line[6:]))
    return events, raw


def test_streamed_chunks_concatenate_to_the_non_streamed_text(client):
    fields = dict(model="lstm", prompt="the ", max_tokens=20, temperature=1.0, seed=3, n=2, ignore_eos=True)
    whole = complete(client, **fields).json()["choices"]
    events, raw = _stream(client, **fields)
    assert raw[-1] == "[DONE]"
    for index in (0, 1):
        pieces = [e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == index]
        assert len(pieces) > 2 and "".join(pieces) == whole[index]["text"]
    assert whole[0]["text"] != whole[1]["text"]  # n choices: seeds seed, seed + 1
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["finish_reason"]]
    assert finishes == ["length", "length"]


def test_stream_with_logprobs_and_usage(client):
    events, _ = _stream(
        client,
        model="gpt",
        prompt="the ",
        max_tokens=5,
        temperature=0,
        logprobs=1,
        stream_options={"include_usage": True},
    )
    pieces = [e for e in events if e["choices"] and e["choices"][0]["logprobs"]]
    assert len(pieces) == 5 and all(len(e["choices"][0]["logprobs"]["token_logprobs"]) == 1 for e in pieces)
    assert events[-1]["usage"]["completion_tokens"] == 5 and events[-1]["choices"] == []


def test_list_prompts_and_n_give_openai_indices(client):
    body = complete(client, model="lstm", prompt=["the ", "a "], n=2, max_tokens=3, seed=1).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 4 + 2 and body["usage"]["completion_tokens"] == 12


def test_stop_strings_end_the_completion(client):
    full = complete(client, model="gpt", prompt="the ", max_tokens=12, temperature=0).json()["choices"][0][
        "text"
    ]
    stop = full[3:5]
    cut = complete(client, model="gpt", prompt="the ", max_tokens=12, temperature=0, stop=[stop]).json()
    assert cut["choices"][0]["text"] == full[: full.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_seq2seq_runs_translate_on_the_same_endpoint(client, root):
    expected = "".join(
        Run.open(root / "runs" / "translate").generate("the red cat", greedy=True, device="cpu")
    )
    body = complete(client, model="translate", prompt="the red cat", max_tokens=32, temperature=0).json()
    assert body["choices"][0]["text"] == expected
    assert_openai_error(complete(client, model="translate", prompt="the cat", echo=True), 400, "echo")


def test_unknown_pieces_are_read_as_unk_with_a_warning(client):
    body = complete(client, model="lstm", prompt="the ☃", max_tokens=2).json()
    # two tokens, not two characters: a sampled <eos> decodes to no text
    assert "'☃'" in body["warnings"][0] and body["usage"]["completion_tokens"] == 2


# ---- bad requests: the right 4xx, OpenAI's shape, and the server keeps serving ---------------------

BAD = {
    "malformed JSON": (b'{"model": "lstm", "prompt": ', 400, None),
    "not an object": (b'["lstm"]', 400, None),
    "wrong type": ({"model": "lstm", "prompt": "the", "max_tokens": "5"}, 400, "max_tokens"),
    "wrong type of prompt": ({"model": "lstm", "prompt": 5}, 400, "prompt"),
    "missing prompt": ({"model": "lstm"}, 400, "prompt"),
    "unknown run": ({"model": "nope", "prompt": "the"}, 404, "model"),
    "a relative path": ({"model": "../../etc/passwd", "prompt": "the"}, 400, "model"),
    "an absolute path": ({"model": "/etc/passwd", "prompt": "the"}, 400, "model"),
    "a hidden name": ({"model": ".lstm", "prompt": "the"}, 400, "model"),
    "negative max_tokens": ({"model": "lstm", "prompt": "the", "max_tokens": -1}, 400, "max_tokens"),
    "huge max_tokens": ({"model": "lstm", "prompt": "the", "max_tokens": 10**9}, 400, "max_tokens"),
    "too many choices": ({"model": "lstm", "prompt": "the", "n": 1000}, 400, "n"),
    "unseen characters": ({"model": "lstm", "prompt": "☃☃☃∮∯"}, 400, "prompt"),
    "unknown field": ({"model": "lstm", "prompt": "the", "beam_width": 2}, 400, "beam_width"),
    "empty prompt list": ({"model": "lstm", "prompt": []}, 400, "prompt"),
    "temperature out of range": ({"model": "lstm", "prompt": "the", "temperature": -1.0}, 400, "temperature"),
    "too many stops": ({"model": "lstm", "prompt": "the", "stop": list("abcdefghijklmnopq")}, 400, "stop"),
    "prompt too long": ({"model": "lstm", "prompt": "the " * 6000}, 400, "prompt"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_its_4xx_and_the_server_goes_on(client, case):
    body, status, param = BAD[case]
    if isinstance(body, bytes):
        response = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    else:
        response = client.post("/v1/completions", json=body)
    error = assert_openai_error(response, status, param)
    if case == "unknown field":
        assert "beam_width" in error["message"] and error["code"] == "unknown_field"
    assert complete(client, model="lstm", prompt="the", max_tokens=2).status_code == 200


# OpenAI fields this server does not implement: what client wrappers send always, and what it cannot honour
NEUTRAL = {
    "frequency_penalty": [0, 0.0, None],
    "presence_penalty": [0, 0.0, None],
    "best_of": [None, 2],  # with n 2
    "logit_bias": [None, {}],
    "suffix": [None, ""],
    "user": [None, "", "someone@example.com"],
}
NOT_HONOURED = {
    "frequency_penalty": 0.5,
    "presence_penalty": -1.0,
    "best_of": 3,  # with n 2
    "logit_bias": {"5": -100},
    "suffix": " the end",
}


def test_openai_fields_at_their_neutral_values_are_accepted(client):
    fields = dict(model="lstm", prompt="the ", max_tokens=6, temperature=0, n=2)
    expected = complete(client, **fields).json()["choices"]
    every = {name: values[-1] for name, values in NEUTRAL.items()}
    response = complete(client, **fields, **every)
    assert response.status_code == 200, response.text
    assert response.json()["choices"] == expected
    for name, values in NEUTRAL.items():
        for value in values:
            response = complete(client, **fields, **{name: value})
            assert response.status_code == 200, (name, value, response.text)
            assert response.json()["choices"] == expected


@pytest.mark.parametrize("name", list(NOT_HONOURED))
def test_openai_fields_this_server_cannot_honour_are_named_as_not_supported(client, name):
    response = complete(client, model="lstm", prompt="the ", max_tokens=2, n=2, **{name: NOT_HONOURED[name]})
    error = assert_openai_error(response, 400, name)
    assert error["code"] == "unsupported_value" and "unknown" not in error["message"]
    assert error["message"].startswith(f"{name}: ") and "not supported" in error["message"]


def test_a_10_mb_body_is_refused_with_413(client):
    body = json.dumps({"model": "lstm", "prompt": "a" * 10_000_000}).encode()
    assert_openai_error(client.post("/v1/completions", content=body), 413)
    assert complete(client, model="lstm", prompt="the", max_tokens=2).status_code == 200


def test_unknown_routes_and_methods_are_openai_errors(client):
    assert_openai_error(client.get("/v1/embeddings"), 404)
    assert_openai_error(client.get("/v1/chat/completions"), 405)
    assert_openai_error(client.get("/v1/completions"), 405)


def test_a_foreign_host_header_is_refused(client):
    """A page in a browser cannot reach a loopback server through a rebinding DNS name."""
    response = client.get("/v1/models", headers={"host": "evil.example:8000"})
    assert_openai_error(response, 421)


# ---- runs that escape --runs, vanish, or are locked -------------------------------------------------


class OpenAudit:
    """Every path opened in this process while active (an audit hook, also seeing worker threads).
    Audit hooks cannot be removed: it is added once, by the first test that needs it."""

    active: list[str] | None = None
    installed = False

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        if cls.active is not None and event == "open" and isinstance(args[0], str | Path):
            cls.active.append(str(args[0]))

    @classmethod
    def start(cls) -> None:
        if not cls.installed:
            sys.addaudithook(cls.hook)
            cls.installed = True
        cls.active = []


def test_symlinks_leading_outside_runs_are_refused_and_never_read(root, tmp_path):
    runs = copy_runs(root, tmp_path / "runs")
    outside = root / "outside" / "secret"
    (runs / "evil").symlink_to(outside, target_is_directory=True)  # a whole run elsewhere
    shutil.copytree(runs / "lstm", runs / "sneaky")  # a run whose best weights point elsewhere
    shutil.rmtree(runs / "sneaky" / "checkpoints" / "best")
    (runs / "sneaky" / "checkpoints" / "best").symlink_to(outside / "checkpoints" / "best")
    app = create_app(runs, device="cpu")
    OpenAudit.start()
    try:
        with TestClient(app, base_url=LOCAL) as local:
            assert [m["id"] for m in local.get("/v1/models").json()["data"]] == ["gpt", "lstm", "translate"]
            for name in ("evil", "sneaky", str(outside), str(outside / "SENTINEL")):
                response = complete(local, model=name, prompt="the", max_tokens=2)
                assert response.status_code in (400, 404), name
            assert complete(local, model="lstm", prompt="the", max_tokens=2).status_code == 200
        opened = list(OpenAudit.active)
    finally:
        OpenAudit.active = None
    assert any(str(runs / "lstm") in path for path in opened)  # the hook sees what the server reads
    assert not [path for path in opened if str(root / "outside") in path]


def test_a_fine_tune_of_a_run_outside_is_refused_without_reading_the_base(root, tmp_path):
    from conftest import base_config_dict, config_from_dict

    from lmzoo.training.loop import train

    runs = copy_runs(root, tmp_path / "runs")
    raw = base_config_dict(runs, root / "corpus.txt", name="tuned") | {
        "init_from": str(root / "outside" / "secret")
    }
    raw["train"] = {**raw["train"], "max_steps": 2, "eval_every": 2}
    train(config_from_dict(raw), progress=False)
    OpenAudit.start()
    try:
        with TestClient(create_app(runs, device="cpu"), base_url=LOCAL) as local:
            error = assert_openai_error(
                complete(local, model="tuned", prompt="the", max_tokens=2), 404, "model"
            )
            assert "outside the runs folder" in error["message"]
        opened = list(OpenAudit.active)
    finally:
        OpenAudit.active = None
    assert any(str(runs / "tuned") in path for path in opened)
    assert not [path for path in opened if str(root / "outside") in path]


def test_a_run_deleted_while_serving_gives_a_clean_404(root, tmp_path):
    runs = copy_runs(root, tmp_path / "runs")
    with TestClient(create_app(runs, device="cpu"), base_url=LOCAL) as local:
        assert complete(local, model="lstm", prompt="the", max_tokens=2).status_code == 200  # loaded, cached
        shutil.rmtree(runs / "lstm")
        assert_openai_error(complete(local, model="lstm", prompt="the", max_tokens=2), 404, "model")
        assert "lstm" not in [m["id"] for m in local.get("/v1/models").json()["data"]]
        assert complete(local, model="gpt", prompt="the", max_tokens=2).status_code == 200


def test_timeout_cuts_a_request_and_frees_the_model(root):
    limits = Limits(timeout_s=0.3, max_tokens=1_000_000)
    with TestClient(create_app(root / "runs", device="cpu", limits=limits), base_url=LOCAL) as local:
        request = complete(local, model="lstm", prompt="the", max_tokens=500_000, ignore_eos=True)
        error = assert_openai_error(request, 504)
        assert error["code"] == "timeout"
        assert complete(local, model="lstm", prompt="the", max_tokens=2).status_code == 200


def test_the_lru_cache_keeps_at_most_cache_size_runs(root):
    app = create_app(root / "runs", device="cpu", cache_size=1)
    with TestClient(app, base_url=LOCAL) as local:
        for name in ("lstm", "gpt", "lstm"):
            assert complete(local, model=name, prompt="the", max_tokens=1).status_code == 200
        cached = app.state.registry._cache
        assert [Path(key).name for key in cached] == ["lstm"]


def test_the_model_lock_is_taken_in_arrival_order_and_a_timed_out_waiter_leaves():
    import threading
    import time

    from lmzoo.serve.runs import FairLock

    lock, order = FairLock(), []
    lock.acquire(lambda: None)
    quitter = threading.Event()

    def waiter(index: int) -> None:
        def check() -> None:
            if index == 2 and quitter.is_set():
                raise TimeoutError

        try:
            lock.acquire(check)
        except TimeoutError:
            order.append("gave up")
            return
        order.append(index)
        lock.release()

    threads = []
    for index in range(5):
        threads.append(threading.Thread(target=waiter, args=(index,)))
        threads[-1].start()
        while len(lock._waiting) < index + 1:  # queued before the next one arrives
            time.sleep(0.001)
    quitter.set()
    while len(lock._waiting) == 5:
        time.sleep(0.001)
    lock.release()
    for thread in threads:
        thread.join(timeout=10)
    assert order == ["gave up", 0, 1, 3, 4]


# ---- API key -------------------------------------------------------------------------------------


def test_api_key_guards_every_endpoint(root):
    with TestClient(create_app(root / "runs", api_key="s3cret", device="cpu"), base_url=LOCAL) as local:
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/mcp")):
            missing = local.request(method, path, json={})
            assert assert_openai_error(missing, 401)["code"] == "missing_api_key"
            assert missing.headers["www-authenticate"] == "Bearer"
            wrong = local.request(method, path, json={}, headers={"Authorization": "Bearer nope"})
            assert assert_openai_error(wrong, 401)["code"] == "invalid_api_key"
        good = local.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert good.status_code == 200 and len(good.json()["data"]) == 3


# ---- limits and the command line -----------------------------------------------------------------


def test_limits_overrides_and_their_errors():
    from lmzoo.errors import ConfigError

    limits = Limits().with_overrides(["timeout_s=2.5", "max-tokens=7"])
    assert limits.timeout_s == 2.5 and limits.max_tokens == 7 and "timeout_s=2.5" in limits.describe()
    for bad in ("nope=1", "timeout_s", "max_tokens=x", "max_n=0"):
        with pytest.raises(ConfigError):
            Limits().with_overrides([bad])


def test_serve_without_the_extra_says_how_to_install(monkeypatch):
    import importlib.util

    from typer.testing import CliRunner

    from lmzoo.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a)
    )
    result = CliRunner().invoke(app, ["serve", "--runs", "."])
    assert result.exit_code == 2
    assert "pip install 'lmzoo[serve]'" in result.output and result.output.count("\n") == 1


def test_finish_reason_says_what_ended_a_translation(root, tmp_path):
    """`length` when the run's data.max_len cut the translation, though max_tokens would allow more, and
    when max_tokens cut it."""
    import yaml

    runs = copy_runs(root, tmp_path / "runs")
    config = yaml.safe_load((runs / "translate" / "config.yaml").read_text())
    config["data"]["max_len"] = 3  # the translation of "the red cat" is longer than 3 characters
    (runs / "translate" / "config.yaml").write_text(yaml.safe_dump(config))
    with TestClient(create_app(runs, device="cpu"), base_url=LOCAL) as local:
        cut = complete(local, model="translate", prompt="the red cat", max_tokens=100, temperature=0).json()
        assert len(cut["choices"][0]["text"]) == 3 and cut["choices"][0]["finish_reason"] == "length", cut
    with TestClient(create_app(root / "runs", device="cpu"), base_url=LOCAL) as local:
        short = complete(local, model="translate", prompt="the cat", max_tokens=2, temperature=0).json()
    assert short["choices"][0]["finish_reason"] == "length" and len(short["choices"][0]["text"]) == 2


# ---- token-id prompts, echo + max_tokens 1, the remote tokenizer ---------------------------------


def test_token_id_prompts_and_echo_with_one_generated_token(client, root):
    """lm-evaluation-harness's loglikelihood request: prompts as token ids, echo + logprobs 1 +
    max_tokens 1: the prompt's logprobs (`lmzoo score`'s), then the generated token's, whose map holds it."""
    run = Run.open(root / "runs" / "gpt")
    texts = ["the cat sat", "a bird sang in"]
    ids = [run.tokenizer.encode(t) for t in texts]
    body = complete(
        client, model="gpt", prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0
    ).json()
    for choice, text, prompt in zip(body["choices"], texts, ids, strict=True):
        block = choice["logprobs"]
        assert len(block["token_logprobs"]) == len(prompt) + 1 and choice["text"].startswith(text)
        scored = run.score(text, device="cpu", top_k=1)
        assert block["token_logprobs"][1:-1] == pytest.approx([t.logprob for t in scored.tokens], abs=1e-5)
        generated, top = block["tokens"][-1], block["top_logprobs"][-1]
        assert top[generated] == block["token_logprobs"][-1] == max(top.values())  # greedy
    assert body["usage"]["prompt_tokens"] == sum(len(p) for p in ids)
    one = complete(client, model="gpt", prompt=ids[0], max_tokens=4, temperature=0).json()["choices"][0]
    assert one["text"] == "".join(
        Run.open(root / "runs" / "gpt").generate(texts[0], greedy=True, max_new_tokens=4, device="cpu")
    )
    for bad in ([[]], [[0, 99999]], [[-1]]):
        assert_openai_error(complete(client, model="gpt", prompt=bad), 400, "prompt")
    assert_openai_error(complete(client, model="translate", prompt=[3, 4]), 400, "prompt")


def test_the_remote_tokenizer_routes(client, root):
    tokenizer = Run.open(root / "runs" / "gpt").tokenizer
    info = client.get("/runs/gpt/tokenizer_info").json()
    assert (
        info["eos_token"] == "<eos>"
        and info["bos_token"] == "\n"
        and info["vocab_size"] == tokenizer.vocab_size
    )
    assert client.get("/tokenizer_info?model=lstm").json()["model"] == "lstm"
    assert_openai_error(client.get("/tokenizer_info"), 400, "model")  # three runs: which one?
    tokens = client.post(
        "/runs/gpt/tokenize", json={"prompt": "the cat<eos>", "add_special_tokens": False}
    ).json()
    assert tokens["tokens"] == tokenizer.encode("the cat") + [tokenizer.eos_id] and tokens["count"] == 8
    back = client.post("/detokenize", json={"tokens": tokenizer.encode("the mat"), "model": "gpt"}).json()
    assert back == {"prompt": "the mat"}
    assert_openai_error(client.post("/runs/gpt/detokenize", json={"tokens": [10**6]}), 400, "tokens")
    assert_openai_error(client.post("/runs/gpt/tokenize", json={"prompt": "x", "text": "x"}), 400, "text")
    assert_openai_error(client.post("/runs/nope/tokenize", json={"prompt": "x"}), 404, "model")
    # a run's own completions route: the body may leave the model out, and may not name another
    routed = client.post("/runs/gpt/v1/completions", json={"prompt": "the", "max_tokens": 2}).json()
    assert routed["model"] == "gpt" and routed["usage"]["completion_tokens"] == 2
    assert_openai_error(
        client.post("/runs/gpt/v1/completions", json={"model": "lstm", "prompt": "a"}), 400, "model"
    )


def test_a_full_queue_gets_429_and_status_shows_the_engine(root):
    limits = Limits(slots=1, max_queue=1, max_tokens=100_000, timeout_s=30)
    app = create_app(root / "runs", device="cpu", limits=limits)
    with TestClient(app, base_url=LOCAL) as local:
        assert complete(local, model="lstm", prompt="the", max_tokens=1).status_code == 200  # loaded
        engine = app.state.registry.engines()["lstm"]
        busy = engine.submit_all(  # the one slot and the one place in the queue taken
            [Request("the", SamplingOptions(max_new_tokens=100_000, ignore_eos=True))] * 2
        )
        try:
            error = assert_openai_error(complete(local, model="lstm", prompt="the", max_tokens=2), 429)
            assert error["code"] == "queue_full" and "busy" in error["message"]
            status = local.get("/status").json()["runs"]["lstm"]
            assert status["slots"] == 1 and status["active"] + status["queued"] == 2
        finally:
            for generation in busy:
                generation.cancel()
        for generation in busy:
            generation.result(timeout=30)
        assert complete(local, model="lstm", prompt="the", max_tokens=2).status_code == 200
