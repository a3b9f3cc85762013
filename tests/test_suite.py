"""The instruction suite (lmzoo suite), batched completions, and exact-match evaluation (lmzoo eval --instructions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT, base_config_dict, config_from_dict, tiny_model_section
from typer.testing import CliRunner

from lmzoo.cli import app
from lmzoo.data.tokenizer import CharTokenizerConfig, fit_tokenizer
from lmzoo.inference import instructions
from lmzoo.inference.complete import Completion, complete
from lmzoo.inference.decoding import generate_ids
from lmzoo.inference.instructions import evaluate_instructions, has_style, is_exact_match, teacher_forced
from lmzoo.inference.loaded import LoadedModel
from lmzoo.inference.sampling import SamplingOptions
from lmzoo.models import build_model
from lmzoo.models.base import PAD_ID
from lmzoo.run import Run
from lmzoo.stages.suite import STYLE_SUFFIX, SuiteSizes, make_suite, write_suite
from lmzoo.training.loop import train

SMALL = SuiteSizes(train=60, val=8, test=8, pairs_train=20, pairs_val=6, pairs_test=6)


def _answer(task: str, instruction: str, text: str) -> str:
    """Each task's answer, computed here from the question alone."""
    if task == "reverse":
        return text[::-1]
    if task == "upper":
        return text.upper()
    if task in ("sort_letters", "sort_digits"):
        return "".join(sorted(text))
    if task == "add":
        a, b = text.split("+")
        return str(int(a) + int(b))
    if task == "subtract":
        a, b = text.split("-")
        return str(int(a) - int(b))
    if task == "count":
        return str(len(text))
    field = instruction.split()[-1].rstrip(".")
    return dict(part.split(": ") for part in text.split(", "))[field]


def test_the_suite_is_deterministic_and_its_held_out_prompts_are_unseen(tmp_path):
    first, again, other = make_suite(3, SMALL), make_suite(3, SMALL), make_suite(4, SMALL)
    assert first == again and first.records["train"] != other.records["train"]
    a, b = write_suite(tmp_path / "a", 3, SMALL), write_suite(tmp_path / "b", 3, SMALL)
    assert all(a[name].read_bytes() == b[name].read_bytes() for name in a)

    train = first.records["train"]
    assert {r.task for r in train} == {
        "reverse",
        "upper",
        "sort_letters",
        "sort_digits",
        "add",
        "subtract",
        "count",
        "copy",
    }
    assert len(train) == 8 * SMALL.train and len(first.records["test"]) == 8 * SMALL.test
    seen_prompts = {r.prompt_key for r in train}
    pair_prompts = {p["prompt"] for p in first.pairs["train"]}
    words = {r.input for r in train if r.task in ("reverse", "upper", "sort_letters", "count")}
    for split in ("val", "test"):
        held_out = first.records[split]
        assert not seen_prompts & {r.prompt_key for r in held_out}
        assert not pair_prompts & {p["prompt"] for p in first.pairs[split]}
        # held-out words are unseen words, not only unseen prompts: no training question holds one
        assert not words & {
            r.input for r in held_out if r.task in ("reverse", "upper", "sort_letters", "count")
        }
        assert all(not r.output.endswith(STYLE_SUFFIX) for r in held_out)
    # with many short words a random split would share some: the split by word shares none
    big = make_suite(0, SuiteSizes(train=2000, val=200, test=0, pairs_train=0, pairs_val=0, pairs_test=0),
                     tasks=("reverse", "upper"))  # fmt: skip
    short = [{r.input for r in big.records[split] if len(r.input) == 3} for split in ("train", "val")]
    assert len(short[0]) > 900 and len(short[1]) > 20 and not short[0] & short[1]
    # every answer is right, and about style_share of the training answers carry the style
    for record in [r for split in first.records.values() for r in split]:
        assert record.output.removesuffix(STYLE_SUFFIX) == _answer(
            record.task, record.instruction, record.input
        )
    styled = sum(r.output.endswith(STYLE_SUFFIX) for r in train) / len(train)
    assert 0.15 < styled < 0.35
    unlabeled = a["unlabeled"].read_text()
    assert unlabeled.count("### Response:\n") == len(train) and train[0].input in unlabeled
    # prompts only: every "### Response:" line is followed by an empty line, never by an answer
    assert unlabeled.count("### Response:\n\n") == len(train)


def test_the_default_sizes_can_be_drawn():
    """7,000 training sums and 1,000 pairs on them fit in the 8,750 sums a training record may ask."""
    suite = make_suite(0)
    sums = [r for r in suite.records["train"] if r.task == "add"]
    assert len(sums) == len({r.prompt_key for r in sums}) == SuiteSizes().train == 7000
    assert len([p for p in suite.pairs["train"] if p["task"] == "add"]) == SuiteSizes().pairs_train


def suite_records(tmp_path, **fields):
    """A DataConfig of instruct records on a small suite's train and val files, with `fields` set."""
    from lmzoo.config.schema import DataConfig

    files = write_suite(tmp_path, 0, SMALL)
    return DataConfig(
        format="instruct", train=str(files["train"]), val=str(files["val"]), split=(1, 0, 0), **fields
    )


def test_data_tasks_keeps_the_records_of_the_tasks_named(tmp_path):
    from lmzoo.data.example_files import read_record_splits
    from lmzoo.errors import DataError

    data = suite_records(tmp_path, tasks=["add", "subtract"])
    parts = read_record_splits(data, ("instruction", "input", "output"))
    assert len(parts["train"]) == 2 * SMALL.train and len(parts["val"]) == 2 * SMALL.val
    assert {r["task"] for split in parts.values() for r in split} == {"add", "subtract"}
    with pytest.raises(DataError, match="no records of data.tasks"):
        read_record_splits(data.model_copy(update={"tasks": ["nope"]}), ("instruction", "input", "output"))


def test_data_task_weights_repeat_the_training_records_of_the_tasks_named(tmp_path):
    from collections import Counter

    from lmzoo.data.example_files import ExampleSplits
    from lmzoo.errors import DataError

    data = suite_records(tmp_path, task_weights={"add": 3, "copy": 2})
    splits = ExampleSplits(data, ("instruction", "input", "output"))
    plain, weighted = list(splits.stream("train")), list(splits.weighted("train"))
    counts = Counter(r["task"] for r in weighted)
    assert counts["add"] == 3 * SMALL.train and counts["copy"] == 2 * SMALL.train
    assert counts["reverse"] == SMALL.train and len(weighted) == len(plain) + 3 * SMALL.train
    assert Counter(map(json.dumps, weighted)) == Counter(
        json.dumps(r) for r in plain for _ in range({"add": 3, "copy": 2}.get(r["task"], 1))
    )
    typo = ExampleSplits(
        data.model_copy(update={"task_weights": {"ad": 3}}), ("instruction", "input", "output")
    )
    with pytest.raises(DataError, match="data.task_weights names task 'ad'"):
        list(typo.weighted("train"))


def test_data_kinds_keeps_the_preference_pairs_of_the_kinds_named(tmp_path):
    from lmzoo.config.schema import DataConfig
    from lmzoo.data.example_files import read_record_splits
    from lmzoo.errors import DataError

    files = write_suite(tmp_path, 0, SMALL)
    data = DataConfig(format="preference", train=str(files["pairs_train"]), kinds=["style"], split=(1, 0, 0))
    data = data.model_copy(update={"val": str(files["pairs_val"])})
    fields = ("prompt", "chosen", "rejected")
    everything = read_record_splits(data.model_copy(update={"kinds": None}), fields, ("kind",))
    parts = read_record_splits(data, fields)
    assert {p["kind"] for split in parts.values() for p in split} == {"style"}
    assert len(parts["train"]) == sum(p["kind"] == "style" for p in everything["train"]) > 0
    with pytest.raises(DataError, match="no records of data.kinds"):
        read_record_splits(data.model_copy(update={"kinds": ["nope"]}), fields)


def test_preference_pairs_set_correct_against_wrong_and_style_against_none():
    suite = make_suite(0, SMALL)
    pairs = [p for split in suite.pairs.values() for p in split]
    kinds = {p["kind"] for p in pairs}
    assert kinds == {"style", "correct"}
    for pair in pairs:
        if pair["kind"] == "style":
            assert pair["chosen"] == pair["rejected"] + STYLE_SUFFIX
        else:  # the same style on both sides, only the answer differs
            assert pair["chosen"] != pair["rejected"]
            assert has_style(pair["chosen"]) == has_style(pair["rejected"])
        assert pair["prompt"].startswith("### Instruction:\n") and pair["prompt"].endswith("### Response:\n")


def test_exact_match_and_style_by_hand(monkeypatch):
    assert is_exact_match(" 393.\n", "393") and is_exact_match("393", "393.")
    assert not is_exact_match("393..", "393") and not is_exact_match("39", "393")
    assert has_style("abc.") and not has_style("abc")
    records = [
        {"task": "add", "instruction": "Add the numbers.", "input": "1+2", "output": "3"},
        {"task": "add", "instruction": "Add the numbers.", "input": "5+5", "output": "10"},
        {"task": "reverse", "instruction": "Reverse the word.", "input": "abc", "output": "cba"},
        {"task": "reverse", "instruction": "Reverse the word.", "input": "xy", "output": "yx"},
        {"task": "reverse", "instruction": "Reverse the word.", "input": "pq", "output": "qp"},
    ]
    answers = ["3.", "11", "cba", " yx ", "qp."]
    # by hand: add 1/2 right, 1/2 styled; reverse 3/3 right, 1/3 styled; overall 4/5 right, 2/5 styled

    def scripted(lm, prompts, options, **kwargs):
        return [
            Completion(list(p), [4] * len(text), True, text) for p, text in zip(prompts, answers, strict=True)
        ]

    monkeypatch.setattr(instructions, "complete", scripted)
    tokenizer = fit_tokenizer(
        CharTokenizerConfig(kind="char"), "".join(json.dumps(r) for r in records) + "#:\n"
    )
    lm = LoadedModel(build_model(tiny_model_section("gpt"), tokenizer.vocab_size), tokenizer)
    scores = evaluate_instructions(lm, records, "{instruction}\n{input}\n", max_new_tokens=4)
    assert scores.exact_match == pytest.approx(4 / 5) and scores.style_rate == pytest.approx(2 / 5)
    assert scores.tasks["add"].as_dict() == {"count": 2, "exact_match": 0.5, "style_rate": 0.5}
    assert scores.tasks["reverse"].as_dict() == {
        "count": 3,
        "exact_match": 1.0,
        "style_rate": pytest.approx(1 / 3),
    }


def _tiny_raw(root: Path, corpus: Path, family: str = "gpt") -> dict:
    raw = base_config_dict(root / "runs", corpus, name=family)
    raw["model"] = tiny_model_section(family, optional={"context_length": 48})
    return raw


@pytest.mark.parametrize("family", ["gpt", "lstm", "modern"])
def test_batched_completions_equal_one_sequence_at_a_time(family):
    torch.manual_seed(0)
    tokenizer = fit_tokenizer(CharTokenizerConfig(kind="char"), TINY_TEXT)
    model = build_model(
        tiny_model_section(family, optional={"context_length": 48}), tokenizer.vocab_size
    ).eval()
    lm = LoadedModel(model, tokenizer)
    prompts = ["the cat", "a bird", "the dog", "the mat", "a"]  # three of one length decode together
    options = SamplingOptions(max_new_tokens=6, greedy=True)
    batched = complete(lm, prompts, options, n=2)
    assert [c.prompt_ids for c in batched[::2]] == [tokenizer.encode(p) for p in prompts]
    for index, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt)
        alone = list(generate_ids(model, ids, options, banned_ids=(0, 1, 2)))
        alone = alone[: alone.index(tokenizer.eos_id)] if tokenizer.eos_id in alone else alone
        assert batched[2 * index].ids == batched[2 * index + 1].ids == alone
    # sampling from a seeded generator is reproducible
    sampled = SamplingOptions(max_new_tokens=6, temperature=1.0)
    runs = [complete(lm, prompts, sampled, n=3, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert [c.ids for c in runs[0]] == [c.ids for c in runs[1]]


def test_teacher_forced_rows_score_only_the_response_and_its_eos():
    done = Completion([5, 6, 7], [8, 9], True, "")
    cut = Completion([5, 6], [8], False, "")
    empty = Completion([5], [], True, "")  # an empty response is its <eos> alone
    inputs, targets = teacher_forced([done, cut, empty], eos_id=3)
    assert inputs.tolist() == [[5, 6, 7, 8, 9], [5, 6, 0, 0, 0], [5, 0, 0, 0, 0]]
    assert targets.tolist() == [[PAD_ID, PAD_ID, 8, 9, 3], [PAD_ID, 8, 0, 0, 0], [3, 0, 0, 0, 0]]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A tiny SFT run on a small suite (read-only)."""
    root = tmp_path_factory.mktemp("suite_sft")
    files = write_suite(root / "suite", 0, SMALL)
    raw = _tiny_raw(root, files["unlabeled"])
    raw["model"]["context_length"] = 96
    raw["data"].update(seq_len=64)
    raw["train"].update(max_steps=4, eval_every=4)
    base = train(config_from_dict(raw), progress=False)
    sft = {
        "name": "sft",
        "out_dir": str(root / "runs"),
        "init_from": str(base),
        "data": {
            "format": "instruct",
            "train": str(files["train"]),
            "val": str(files["val"]),
            "batch_size": 4,
        },
        "train": {"max_steps": 4, "eval_every": 4, "warmup_steps": 0, "device": "cpu", "precision": "fp32"},
    }
    return train(config_from_dict(sft), progress=False), files


def test_lmzoo_suite_and_eval_instructions_on_the_command_line(sft_run, tmp_path):
    run_dir, files = sft_run
    runner = CliRunner()
    made = runner.invoke(app, ["suite", "--out", str(tmp_path / "s"), "--seed", "0", "--train", "60", "--val", "8",
                               "--test", "8", "--pairs", "20", "--pairs-held-out", "6"])  # fmt: skip
    assert made.exit_code == 0, made.output
    assert (tmp_path / "s" / "test.jsonl").read_bytes() == files["test"].read_bytes()

    result = runner.invoke(app, ["eval", "--run", str(run_dir), "--instructions", str(files["test"]), "--json",
                                 "--device", "cpu", "--max-new-tokens", "6", "--reference", str(run_dir)])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    expected = Run.open(run_dir).evaluate_instructions(files["test"], max_new_tokens=6, device="cpu")
    assert report["exact_match"] == expected.exact_match and report["count"] == 64
    assert set(report["tasks"]) == {
        "reverse",
        "upper",
        "sort_letters",
        "sort_digits",
        "add",
        "subtract",
        "count",
        "copy",
    }
    assert report["kl"] == pytest.approx(0.0, abs=1e-6)  # a model does not diverge from itself

    table = runner.invoke(
        app, ["eval", "--run", str(run_dir), "--instructions", str(files["test"]), "--max-new-tokens", "6"]
    )
    assert table.exit_code == 0 and "exact match" in table.stdout and "sort_digits" in table.stdout


def test_eval_instructions_refuses_bad_input_in_one_line(sft_run, tmp_path):
    run_dir, files = sft_run
    runner = CliRunner()
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"instruction": "Add.", "input": "1+1"}\n')
    long = tmp_path / "long.jsonl"
    long.write_text(
        json.dumps({"instruction": "Add the numbers.", "input": "1+1" * 40, "output": "2"}) + "\n"
    )
    for path, message in (
        (missing, "field 'output' is missing"),
        (long, "longer than the model's context of 96"),
    ):
        result = runner.invoke(
            app, ["eval", "--run", str(run_dir), "--instructions", str(path), "--device", "cpu"]
        )
        assert result.exit_code == 2, result.output
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
