"""Chat: templates (an SFT run's own data.template, the default dialogue one, none for seq2seq), the
official `openai` client's chat interface against /v1/chat/completions (streamed and not), bad chat
requests, and `lmzoo generate --chat`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SENTENCES, base_config_dict, config_from_dict

pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from serve_runs import copy_runs, serve_root, serving  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from lmzoo.cli import app  # noqa: E402
from lmzoo.errors import ConfigError  # noqa: E402
from lmzoo.inference.chat import DIALOGUE, ChatTemplate, conversation  # noqa: E402
from lmzoo.run import Run  # noqa: E402
from lmzoo.serve import Limits, create_app  # noqa: E402

TEMPLATE = "q: {instruction}\n{input}a: "
KEY = "chat-key"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The serving runs (gpt, lstm, translate) and `sft`: the gpt instruction-tuned with TEMPLATE."""
    from lmzoo.training.loop import train

    root = serve_root(tmp_path_factory)
    folder = copy_runs(root, tmp_path_factory.mktemp("chat") / "runs")
    records = [{"instruction": s.split(" ")[1], "input": "", "output": s} for s in SENTENCES] * 4
    data = folder.parent / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    raw = base_config_dict(folder, root / "corpus.txt", name="sft")
    raw.pop("model")
    raw.pop("tokenizer")
    raw.update(init_from=str(folder / "gpt"), finetune={"method": "full"})
    raw["data"] = {"format": "instruct", "train": str(data), "template": TEMPLATE, "batch_size": 4}
    raw["train"] = {**raw["train"], "max_steps": 4, "eval_every": 4}
    train(config_from_dict(raw), progress=False)
    return folder


# ---- templates -------------------------------------------------------------------------------------


def test_the_dialogue_template_reads_like_a_play_script(runs):
    tokenizer = Run.open(runs / "gpt").tokenizer
    messages = [("system", "be brief"), ("user", "the cat"), ("assistant", "sat"), ("user", "the dog")]
    ids, _ = DIALOGUE.render(messages, tokenizer)
    text = "be brief\n\nUSER:\nthe cat\n\nASSISTANT:\nsat\n\nUSER:\nthe dog\n\nASSISTANT:\n"
    assert ids == tokenizer.encode(text) and DIALOGUE.stops == ("\n\n",)


def test_an_instruct_template_renders_turns_as_the_tuning_records_were_read(runs):
    run = Run.open(runs / "sft")
    template, tokenizer = run.chat_template(), run.tokenizer
    assert template == ChatTemplate.instruct(TEMPLATE) and template.stops == ("q:",)
    messages = [("system", "ctx\n"), ("user", "cat"), ("assistant", "the cat sat"), ("user", "dog")]
    ids, _ = template.render(messages, tokenizer)
    first = tokenizer.encode("q: cat\nctx\na: ") + tokenizer.encode("the cat sat") + [tokenizer.eos_id]
    assert ids == first + tokenizer.encode("q: dog\nctx\na: ")  # prompt + response + <eos>, as in SFT


def test_which_runs_have_which_template(runs):
    assert Run.open(runs / "gpt").chat_template() is DIALOGUE
    with pytest.raises(ConfigError, match="seq2seq"):
        Run.open(runs / "translate").chat_template()


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], "at least one"),
        ([("tool", "x"), ("user", "y")], "role"),
        ([("assistant", "hi"), ("user", "y")], "before any user"),
        ([("user", "hi"), ("assistant", "there")], "end with a user"),
    ],
)
def test_a_conversation_that_does_not_fit_is_refused(messages, error):
    with pytest.raises(ConfigError, match=error):
        conversation(messages)


# ---- /v1/chat/completions with the official client ---------------------------------------------------


@pytest.fixture(scope="module")
def server(runs):
    with serving(create_app(runs, api_key=KEY, device="cpu", limits=Limits(timeout_s=30))) as url:
        yield url


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60) as api:
        yield api


def expected_reply(run: Run, messages: list[tuple[str, str]], max_tokens: int) -> str:
    template = run.chat_template()
    ids, _ = template.render(messages, run.tokenizer)
    steps = run.decode(ids, device="cpu", greedy=True, max_new_tokens=max_tokens, stop=list(template.stops))
    return "".join(step.text for step in steps)


@pytest.mark.parametrize("name", ["gpt", "sft"])
def test_openai_client_chat_equals_the_template_decoded(runs, client, name):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}]
    result = client.chat.completions.create(
        model=name, messages=messages, max_completion_tokens=12, temperature=0, logprobs=True, top_logprobs=2
    )
    choice = result.choices[0]
    expected = expected_reply(Run.open(runs / name), [(m["role"], m["content"]) for m in messages], 12)
    assert expected and choice.message.role == "assistant" and choice.message.content == expected
    assert result.object == "chat.completion" and choice.finish_reason in ("stop", "length")
    assert result.usage.completion_tokens == len(choice.logprobs.content) > 0
    assert all(len(entry.top_logprobs) == 2 for entry in choice.logprobs.content)
    best = choice.logprobs.content[0]
    assert best.logprob == pytest.approx(max(t.logprob for t in best.top_logprobs))  # greedy


def test_openai_client_chat_streams_the_same_reply(client):
    fields = dict(
        model="gpt",
        messages=[{"role": "user", "content": "the dog"}],
        max_tokens=16,
        temperature=1.0,
        seed=5,
        n=2,
    )
    whole = client.chat.completions.create(**fields)
    pieces: dict[int, list[str]] = {0: [], 1: []}
    roles, finishes, usage = [], {}, None
    for chunk in client.chat.completions.create(
        **fields, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            roles += [choice.delta.role] if choice.delta.role else []
            pieces[choice.index].append(choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    for index in (0, 1):
        assert "".join(pieces[index]) == whole.choices[index].message.content
        assert finishes[index] == whole.choices[index].finish_reason
    assert roles == ["assistant", "assistant"] and usage.completion_tokens == whole.usage.completion_tokens
    assert whole.choices[0].message.content != whole.choices[1].message.content  # n: seeds 5 and 6


BAD_CHATS = {
    "no messages": ({"model": "gpt", "messages": []}, "messages"),
    "a role the template has not": (
        {"model": "gpt", "messages": [{"role": "tool", "content": "x"}, {"role": "user", "content": "y"}]},
        "messages",
    ),
    "no user turn last": (
        {
            "model": "gpt",
            "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
        },
        "messages",
    ),
    "a seq2seq run": ({"model": "translate", "messages": [{"role": "user", "content": "the cat"}]}, "model"),
    "wrong content type": ({"model": "gpt", "messages": [{"role": "user", "content": 5}]}, "messages"),
    "top_logprobs without logprobs": (
        {"model": "gpt", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        "top_logprobs",
    ),
    "unknown field": ({"model": "gpt", "messages": [{"role": "user", "content": "x"}], "tools": []}, "tools"),
}


@pytest.mark.parametrize("case", list(BAD_CHATS))
def test_a_bad_chat_request_gets_its_400_and_the_next_is_served(server, client, case):
    import httpx2

    body, param = BAD_CHATS[case]
    response = httpx2.post(
        f"{server}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and "\n" not in error["message"]
    reply = client.chat.completions.create(
        model="gpt", messages=[{"role": "user", "content": "the"}], max_tokens=3
    )
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens >= 1


# ---- lmzoo generate --chat -------------------------------------------------------------------------


def test_generate_chat_answers_with_the_runs_template(runs):
    args = ["generate", "-r", str(runs / "sft"), "--chat", "--greedy", "--max-new-tokens", "12"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--seed", "cat", "--system", "ctx\n"])
    assert result.exit_code == 0, result.output
    expected = expected_reply(Run.open(runs / "sft"), [("system", "ctx\n"), ("user", "cat")], 12)
    assert expected and result.stdout == expected + "\n"
    refused = CliRunner().invoke(app, ["generate", "-r", str(runs / "translate"), "--chat", "-s", "x"])
    assert refused.exit_code == 2 and refused.output.startswith("error: ") and "seq2seq" in refused.output
