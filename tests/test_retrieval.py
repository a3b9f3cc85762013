"""Retrieval: kNN-LM datastores (lmzoo index, --knn) and BM25 passages (lmzoo rag index, --rag)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT, base_config_dict, config_from_dict, deep_merge, tiny_model_section
from typer.testing import CliRunner

from lmzoo.cli import app
from lmzoo.errors import CheckpointError, ConfigError
from lmzoo.run import Run

pytest.importorskip("faiss", reason="the retrieval extra is not installed: pip install 'lmzoo[retrieval]'")
pytest.importorskip("bm25s", reason="the retrieval extra is not installed: pip install 'lmzoo[retrieval]'")

from lmzoo.retrieval.bm25 import Bm25Index, chunk_lines  # noqa: E402
from lmzoo.retrieval.interpolate import knn_logprobs, knn_target_logprob, neighbour_scores, with_knn  # noqa: E402
from lmzoo.retrieval.knn import Datastore, build_datastore  # noqa: E402
from lmzoo.retrieval.knn_eval import collect, evaluate_tokens, mixed_loss  # noqa: E402
from lmzoo.retrieval.rag import chunk_sequences, leaks, retrieve  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory) -> Path:
    """A tiny GPT (context 64) trained a few steps on TINY_TEXT."""
    from lmzoo.training.loop import train

    root = tmp_path_factory.mktemp("gpt_run")
    corpus = root / "corpus.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    extra = {
        "model": tiny_model_section("gpt", context_length=64),
        "data": {"seq_len": 16},
        "train": {"max_steps": 30},
    }
    raw = deep_merge(base_config_dict(root / "runs", corpus, name="gpt"), extra)
    raw["model"] = extra["model"]
    return train(config_from_dict(raw), progress=False)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, trained_run: Path, gpt_run: Path) -> dict[str, Path]:
    """A datastore over TINY_TEXT for the shared LSTM and for the GPT."""
    root = tmp_path_factory.mktemp("stores")
    corpus = root / "text.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    built = {"text": corpus}
    for name, path in (("lstm", trained_run), ("gpt", gpt_run)):
        build_datastore(Run.open(path), [corpus], root / name)
        built[name] = root / name
    return built


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


# ---- kNN-LM -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["lstm", "gpt"])
def test_lambda_zero_is_the_plain_model_bit_for_bit(family, trained_run, gpt_run, stores):
    run = Run.open(trained_run if family == "lstm" else gpt_run)
    plain = run.evaluate(stores["text"], device="cpu")["loss"]
    mixed = with_knn(run, stores[family], k=8, lmbda=0.0).evaluate(stores["text"], device="cpu")["loss"]
    assert mixed == plain
    assert (
        with_knn(run, stores[family], k=8, lmbda=0.3).evaluate(stores["text"], device="cpu")["loss"] != plain
    )


def test_knn_distribution_sums_to_one_and_matches_the_target_formula():
    torch.manual_seed(0)
    distances = torch.rand(6, 10).sort(-1).values * 50
    values = torch.randint(0, 7, (6, 10))
    values[0, 5:] = -1  # fewer neighbours found than asked for
    logp = knn_logprobs(distances, values, vocab=7, temperature=3.0)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(6, dtype=torch.float64), atol=1e-12)
    targets = torch.tensor([values[0, 0], 1, 2, 3, 4, 5])
    direct = knn_target_logprob(neighbour_scores(distances, values, 3.0), values, targets)
    assert torch.allclose(direct, logp.gather(1, targets[:, None]).squeeze(1), atol=1e-9)
    # by hand for row 0: only the 5 neighbours found count
    weights = torch.exp(-distances[0, :5].double() / 3.0)
    expected = weights[values[0, :5] == values[0, 0]].sum() / weights.sum()
    assert math.isclose(float(direct[0].exp()), float(expected), rel_tol=1e-9)


def test_mixed_model_gives_a_distribution(gpt_run, stores):
    mixed = with_knn(Run.open(gpt_run), stores["gpt"], k=16, lmbda=0.5, temperature=2.0)
    model = mixed.model("best", "cpu")
    logp, _ = model(torch.tensor([[3, 4, 5, 6]]), None)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(1, 4), atol=1e-5)


@pytest.mark.parametrize("family", ["lstm", "gpt"])
def test_a_store_of_the_evaluated_text_drives_its_loss_near_zero(family, trained_run, gpt_run, stores):
    run = Run.open(trained_run if family == "lstm" else gpt_run)
    plain = run.evaluate(stores["text"], device="cpu")["loss"]
    mixed = with_knn(run, stores[family], k=4, lmbda=0.999, temperature=1e-3)
    loss = mixed.evaluate(stores["text"], device="cpu")["loss"]
    # The LSTM carries its state, so every stored state has its full past: the store answers exactly.
    # A GPT window starts afresh; its first positions see one or two characters, which in this text
    # are followed by different ones, so a few positions stay uncertain.
    assert plain > 0.5 and loss < (0.02 if family == "lstm" else 0.1 * plain)


def test_tuning_formula_equals_the_mixed_model(gpt_run, stores):
    mixed = with_knn(Run.open(gpt_run), stores["gpt"], k=16, lmbda=0.4, temperature=5.0)
    ids = torch.tensor(mixed.tokenizer.encode(TINY_TEXT[:400]))
    lm, dists, match = collect(mixed, ids, checkpoint_tag="best", device=CPU)
    fast = float(mixed_loss(lm, dists, match, (0.0, 0.4), 5.0)[1])
    assert math.isclose(fast, evaluate_tokens(mixed, ids, device=CPU)["loss"], rel_tol=1e-5)
    assert math.isclose(
        float(-lm.mean()), evaluate_tokens(Run.open(gpt_run), ids, device=CPU)["loss"], rel_tol=1e-5
    )


def test_score_with_knn_follows_eval(gpt_run, stores, runner, tmp_path):
    mixed = with_knn(Run.open(gpt_run), stores["gpt"], k=16, lmbda=0.5, temperature=5.0)
    (tmp_path / "t.txt").write_text(TINY_TEXT[:300], encoding="utf-8")
    scored = mixed.score(TINY_TEXT[:300], device="cpu")
    assert math.isclose(scored.loss, mixed.evaluate(tmp_path / "t.txt", device="cpu")["loss"], rel_tol=1e-5)
    args = ["score", "--run", str(gpt_run), "--text", TINY_TEXT[:60], "--knn", str(stores["gpt"]), "--k", "8"]
    assert runner.invoke(app, args).exit_code == 0


def test_generation_queries_the_store_once_per_token(gpt_run, stores, monkeypatch):
    calls = []
    original = Datastore.search
    monkeypatch.setattr(Datastore, "search", lambda self, q, k: calls.append(q.shape) or original(self, q, k))
    mixed = with_knn(Run.open(gpt_run), stores["gpt"], k=8, lmbda=0.5)
    text = "".join(mixed.generate("the ", max_new_tokens=6, seed=1, device="cpu"))
    assert len(text) > 0 and len(calls) == 6  # the prompt once, then one query per token fed back (5)
    assert all(shape[1] == 1 for shape in calls[1:])


def test_index_built_for_another_model_is_refused(gpt_run, stores, runner):
    with pytest.raises(CheckpointError, match="another model"):
        with_knn(Run.open(gpt_run), stores["lstm"])
    result = runner.invoke(app, ["eval", "--run", str(gpt_run), "--knn", str(stores["lstm"])])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "error:" in result.output


def test_k_larger_than_the_store_is_refused(gpt_run, stores, runner):
    size = Datastore.load(stores["gpt"], Run.open(gpt_run)).size
    with pytest.raises(ConfigError, match="store's size"):
        with_knn(Run.open(gpt_run), stores["gpt"], k=size + 1)
    result = runner.invoke(
        app, ["eval", "--run", str(gpt_run), "--knn", str(stores["gpt"]), "--k", str(size + 1)]
    )
    assert result.exit_code == 2 and "store's size" in result.output


def test_index_and_eval_and_generate_on_the_command_line(gpt_run, stores, runner, tmp_path):
    out = tmp_path / "store"
    args = ["index", "--run", str(gpt_run), "--data", str(stores["text"]), "--out", str(out), "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file() and "flat" in result.output
    again = runner.invoke(app, args)  # an existing store is never overwritten
    assert again.exit_code == 2 and "already exists" in again.output
    result = runner.invoke(app, ["eval", "--run", str(gpt_run), "--knn", str(out), "--k", "8", "--tune"])
    assert result.exit_code == 0, result.output
    assert "tuned on the first half" in result.output and "with kNN" in result.output
    result = runner.invoke(
        app,
        [
            "generate",
            "--run",
            str(gpt_run),
            "--knn",
            str(out),
            "--k",
            "8",
            "-s",
            "the",
            "--max-new-tokens",
            "5",
        ],
    )
    assert result.exit_code == 0 and result.output.startswith("the")


def test_ivf_index_is_chosen_and_recorded(gpt_run, stores, tmp_path):
    manifest = build_datastore(Run.open(gpt_run), [stores["text"]], tmp_path / "ivf", index="ivf")
    assert manifest["index"]["kind"] == "ivf_fp16" and manifest["index"]["nlist"] >= 1
    assert (tmp_path / "ivf" / "index.faiss").is_file()
    store = Datastore.load(tmp_path / "ivf", Run.open(gpt_run))
    distances, values = store.search(torch.zeros(2, manifest["dim"]), 4)
    assert distances.shape == (2, 4) and values.shape == (2, 4)


def test_ivf_search_recalls_the_exact_neighbours():
    """The IVF index a large store gets (defaults: ~sqrt(N) lists, nprobe 32) finds at least 90% of the
    exact 16 nearest neighbours of the flat index over the same float16 keys (clustered, as hidden
    states are)."""
    import numpy as np

    from lmzoo.retrieval.knn import build_faiss, choose_index

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(128, 64)).astype(np.float32)

    def draw(count: int) -> np.ndarray:
        return (centres[rng.integers(0, len(centres), count)] + 0.5 * rng.normal(size=(count, 64))).astype(
            np.float16
        )

    keys, queries, k = draw(32_768), draw(300).astype(np.float32), 16
    spec = choose_index(len(keys), "ivf")
    assert spec["kind"] == "ivf_fp16" and spec["nlist"] == 256 and spec["nprobe"] == 32
    _, approximate = build_faiss(keys, spec).search(queries, k)
    _, exact = build_faiss(keys, choose_index(len(keys), "flat")).search(queries, k)
    recall = np.mean([len(set(a) & set(e)) / k for a, e in zip(approximate, exact, strict=True)])
    assert recall >= 0.9, f"IVF recall@{k} {recall:.3f}"


# ---- BM25 passages ------------------------------------------------------------------------------


def write_docs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text("the cat sat on the mat.\n" * 30, encoding="utf-8")
    (folder / "sub").mkdir(exist_ok=True)
    lines = (
        ["a bird sang in the tree.\n"] * 20
        + ["the purple elephant dances at midnight.\n"]
        + ["the dog.\n"] * 10
    )
    (folder / "sub" / "b.md").write_text("".join(lines), encoding="utf-8")
    return folder


def test_bm25_finds_the_passage_with_a_unique_phrase(tmp_path):
    Bm25Index.build(write_docs(tmp_path / "docs"), tmp_path / "index", passage_chars=120)
    found = Bm25Index.load(tmp_path / "index").search("purple elephant", k=2)
    assert found[0].file == "sub/b.md" and "purple elephant" in found[0].text
    first, last = found[0].lines
    assert first <= 21 <= last  # the phrase is on line 21 of b.md
    assert found[0].score > 0


def test_chunks_overlap_and_keep_line_spans():
    text = "".join(f"line {i}\n" for i in range(1, 11))
    chunks = chunk_lines(text, "f.txt", passage_chars=20, overlap_lines=1)
    assert chunks[0].lines == (1, 3) and chunks[1].lines[0] == 3
    assert chunks[-1].lines[1] == 10
    assert all(c.text == "".join(f"line {i}\n" for i in range(c.lines[0], c.lines[1] + 1)) for c in chunks)


def test_leakage_guard_excludes_the_evaluated_passage(gpt_run, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "eval.txt").write_text(TINY_TEXT, encoding="utf-8")
    Bm25Index.build(docs, tmp_path / "index", passage_chars=60)
    index, run = Bm25Index.load(tmp_path / "index"), Run.open(gpt_run)
    ids = run.tokenizer.encode(TINY_TEXT[:200])
    conditions, chunk, guarded = chunk_sequences(ids, run.tokenizer, index, window=32, passages=1, seed=0)
    assert guarded > 0  # without the guard, the evaluated text itself would have been retrieved
    for seq in conditions["retrieved"] + conditions["random"]:
        chunk_text = run.tokenizer.decode(seq[-chunk:])
        passage = run.tokenizer.decode(seq[: -2 * chunk])
        assert chunk_text not in passage
    assert leaks("the cat sat on the mat.")(index.passages[0])


def test_rag_generate_and_eval(gpt_run, tmp_path, runner):
    write_docs(tmp_path / "docs")
    assert (
        runner.invoke(
            app,
            [
                "rag",
                "index",
                str(tmp_path / "docs"),
                "--out",
                str(tmp_path / "small"),
                "--passage-chars",
                "10",
            ],
        ).exit_code
        == 0
    )
    result = runner.invoke(
        app,
        [
            "generate",
            "--run",
            str(gpt_run),
            "--rag",
            str(tmp_path / "small"),
            "-s",
            "the cat",
            "--max-new-tokens",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("the cat") and "sources: a.txt:" in result.output
    result = runner.invoke(app, ["eval", "--run", str(gpt_run), "--rag", str(tmp_path / "small")])
    assert result.exit_code == 0, result.output
    assert (
        "no passage" in result.output
        and "random passage" in result.output
        and "BM25 passage" in result.output
    )
    # passages too long for a 64-token context: refused in one line
    runner.invoke(
        app,
        ["rag", "index", str(tmp_path / "docs"), "--out", str(tmp_path / "big"), "--passage-chars", "400"],
    )
    result = runner.invoke(
        app, ["generate", "--run", str(gpt_run), "--rag", str(tmp_path / "big"), "-s", "the cat"]
    )
    assert result.exit_code == 2 and "cannot hold" in result.output and result.output.count("\n") == 1


def test_retrieve_on_run_fits_the_context(gpt_run, tmp_path):
    Bm25Index.build(write_docs(tmp_path / "docs"), tmp_path / "index", passage_chars=10)
    found = retrieve(Run.open(gpt_run), "purple elephant", tmp_path / "index", k=1)
    assert len(found) == 1 and "purple" in found[0].text and found[0].source.startswith("sub/b.md:")


# ---- bad input: one line, exit 2, nothing written ------------------------------------------------


def _one_error_line(result) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1


def test_bad_document_folders_are_refused_without_writing(tmp_path, runner):
    (tmp_path / "empty").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(b"\x89PNG\x00\x00")
    write_docs(tmp_path / "binary")
    (tmp_path / "binary" / "blob.txt").write_bytes(b"text\x00\x01\x02 binary")
    for folder, message in (("empty", "is empty"), ("images", "no .txt or .md"), ("binary", "binary file")):
        result = runner.invoke(app, ["rag", "index", str(tmp_path / folder), "--out", str(tmp_path / "out")])
        _one_error_line(result)
        assert message in result.output
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_bad_datastore_inputs_are_refused(gpt_run, stores, tmp_path, runner):
    docs = write_docs(tmp_path / "docs")
    Bm25Index.build(docs, tmp_path / "passages")
    for args in (
        ["eval", "--run", str(gpt_run), "--knn", str(tmp_path / "passages")],  # not a datastore
        ["eval", "--run", str(gpt_run), "--rag", str(stores["gpt"])],  # not a passage index
        [
            "index",
            "--run",
            str(gpt_run),
            "--data",
            str(tmp_path / "missing.txt"),
            "--out",
            str(tmp_path / "s"),
        ],
        ["eval", "--run", str(gpt_run), "--knn", str(stores["gpt"]), "--lmbda", "1.5"],
    ):
        _one_error_line(runner.invoke(app, args))
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.tmp-*"))


# ---- manifest format versions: a newer or garbled one is refused in one line ------------------------

VERSIONS = {
    "newer": (2, "format version 2 is newer than this lmzoo reads; upgrade lmzoo"),
    "missing": (..., "has no format version"),
    "null": (None, "format version null is not a version number"),
    "a string": ("1", 'format version "1" is not a version number'),
    "a fraction": (1.5, "format version 1.5 is not a version number"),
    "zero": (0, "format version 0 is not a version number"),
}


def _with_version(directory: Path, version) -> Path:
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    if version is ...:
        del manifest["version"]
    else:
        manifest["version"] = version
    (directory / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return directory


@pytest.mark.parametrize("case", list(VERSIONS))
def test_a_datastore_of_another_format_version_is_refused(gpt_run, stores, tmp_path, runner, case):
    version, message = VERSIONS[case]
    store = _with_version(Path(shutil.copytree(stores["gpt"], tmp_path / "store")), version)
    with pytest.raises(CheckpointError) as caught:
        Datastore.load(store, Run.open(gpt_run))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    result = runner.invoke(app, ["eval", "--run", str(gpt_run), "--knn", str(store)])
    _one_error_line(result)
    assert message in result.output and "kNN datastore" in result.output


@pytest.mark.parametrize("case", list(VERSIONS))
def test_a_passage_index_of_another_format_version_is_refused(gpt_run, tmp_path, runner, case):
    version, message = VERSIONS[case]
    Bm25Index.build(write_docs(tmp_path / "docs"), tmp_path / "index", passage_chars=10)
    assert Bm25Index.load(tmp_path / "index").manifest["version"] == 1  # what this lmzoo writes reads back
    index = _with_version(tmp_path / "index", version)
    with pytest.raises(CheckpointError) as caught:
        Bm25Index.load(index)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    result = runner.invoke(app, ["generate", "--run", str(gpt_run), "--rag", str(index), "-s", "the cat"])
    _one_error_line(result)
    assert message in result.output and "passage index" in result.output


def test_the_context_is_read_from_the_config_without_touching_the_weights(gpt_run, trained_run, tmp_path):
    """context_of reads model.context_length from the run's config: it works with the weights deleted
    or garbled (and None for a recurrent model)."""
    from lmzoo.retrieval.rag import context_of

    for name, source, expected in (("gpt", gpt_run, 64), ("lstm", trained_run, None)):
        copy = Path(shutil.copytree(source, tmp_path / name))
        weights = sorted(copy.glob("checkpoints/*/model.safetensors"))
        assert weights
        weights[0].write_bytes(b"not a safetensors file")
        for other in weights[1:]:
            other.unlink()
        run = Run.open(copy)
        assert context_of(run) == expected
        with pytest.raises(CheckpointError):
            run.model()  # the weights really are unusable
