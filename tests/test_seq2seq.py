"""Every registered seq2seq model against the encode/decode contract, decoding (greedy, beam search,
incremental state), parallel/TSV data errors, and tiny copy/reverse tasks actually being learned."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_section

from lmzoo.config import DataConfig, TrainConfig
from lmzoo.data.example_files import ExampleSplits, read_pair_file
from lmzoo.data.examples import collate_pairs, encode_pairs, pair_batches
from lmzoo.data.tokenizer import CharTokenizer
from lmzoo.errors import ConfigError, DataError
from lmzoo.inference.decoding import SamplingOptions, Seq2SeqStepper, SequenceDecoder, run_decoder
from lmzoo.inference.evaluate import evaluate_seq2seq, translate_corpus
from lmzoo.inference.seq2seq import beam_search, decode_batch, translate
from lmzoo.models import build_model, get_model_info, list_models
from lmzoo.models.base import PAD_ID, Seq2SeqModel, select_rows
from lmzoo.training.optim import lr_at

SEQ2SEQ_MODELS = [info.name for info in list_models() if info.kind == "seq2seq"]
SRC_VOCAB, TGT_VOCAB = 19, 23
BOS, EOS = 1, 2  # real tokens are drawn from 3 .. vocab - 1 (PAD_ID is 0)

# Registered families at their tiny defaults, plus the other options of the families shipped today.
EXTRA_VARIANTS = [
    ("seq2seq", {"cell": "gru", "attention": "additive"}),
    ("seq2seq", {"bidirectional": False, "attention": "dot", "encoder_layers": 2, "decoder_layers": 2}),
    ("seq2seq", {"share_embeddings": True, "tie_weights": True}),
    ("transformer", {"norm": "pre", "attention": "explicit"}),
    ("transformer", {"share_embeddings": True, "tie_weights": False, "n_heads": 4}),
]
VARIANTS = [(name, {}) for name in SEQ2SEQ_MODELS] + [
    (n, e) for n, e in EXTRA_VARIANTS if n in SEQ2SEQ_MODELS
]
VARIANT_IDS = [name + "".join(f"-{k}={v}" for k, v in extra.items()) for name, extra in VARIANTS]


def tiny_seq2seq(name: str, seed: int = 0, **extra) -> Seq2SeqModel:
    """A tiny model; separate source/target vocabularies unless the variant shares its embeddings (then both
    have TGT_VOCAB ids, which covers the source ids the tests draw)."""
    torch.manual_seed(seed)
    shared = extra.get("share_embeddings", False)
    section = tiny_model_section(name, optional={"share_embeddings": False}, **extra)
    return build_model(section, (TGT_VOCAB, TGT_VOCAB) if shared else (SRC_VOCAB, TGT_VOCAB))


def random_pairs(lengths: list[tuple[int, int]], seed: int):
    """(source ids + <eos>, target ids) pairs of the given lengths, with no special token inside."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for src_len, tgt_len in lengths:
        src = torch.randint(3, SRC_VOCAB, (src_len,), generator=generator).tolist()
        tgt = torch.randint(3, TGT_VOCAB, (tgt_len,), generator=generator).tolist()
        pairs.append((src + [EOS], tgt))
    return pairs


def batch_of(pairs):
    return collate_pairs(pairs, bos_id=BOS, eos_id=EOS)


# ---- the forward contract -------------------------------------------------------------------------


@pytest.mark.parametrize("name", SEQ2SEQ_MODELS)
def test_forward_shapes_finite_and_loss(name):
    model = tiny_seq2seq(name).eval()
    assert get_model_info(name).kind == "seq2seq" and model.kind == "seq2seq"
    batch = batch_of(random_pairs([(5, 4), (3, 6), (7, 1)], seed=1))
    assert batch.source.shape == (3, 8) and batch.target_in.shape == (3, 7)
    with torch.no_grad():
        logits, none = model(batch.source, batch.target_in)
        loss, _ = model(batch.source, batch.target_in, targets=batch.target_out)
    assert none is None
    assert logits.shape == (3, 7, TGT_VOCAB)
    assert torch.isfinite(logits).all()
    # The loss is the mean cross-entropy over the real (non-pad) target tokens.
    keep = batch.target_out != PAD_ID
    assert int(keep.sum()) == 4 + 6 + 1 + 3  # each target + <eos>
    assert loss.shape == () and torch.allclose(
        loss, F.cross_entropy(logits[keep], batch.target_out[keep]), atol=1e-5
    )
    # decode() with no state is the teacher-forced forward.
    with torch.no_grad():
        src_mask = batch.source == PAD_ID
        decoded, _ = model.decode(batch.target_in, model.encode(batch.source, src_mask), src_mask)
    assert torch.allclose(decoded, logits, atol=1e-6)


@pytest.mark.parametrize(("name", "extra"), VARIANTS, ids=VARIANT_IDS)
def test_every_parameter_gets_a_nonzero_gradient(name, extra):
    model = tiny_seq2seq(name, **extra).train()
    batch = batch_of(random_pairs([(6, 5), (4, 7), (2, 3)], seed=2))
    loss, _ = model(batch.source, batch.target_in, targets=batch.target_out)
    loss.backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, f"{pname} got an all-zero gradient"


@pytest.mark.parametrize(("name", "extra"), VARIANTS, ids=VARIANT_IDS)
def test_padding_does_not_change_the_output(name, extra):
    model = tiny_seq2seq(name, **extra).eval()
    short, long = random_pairs([(3, 2), (9, 8)], seed=3)
    for order in ([short, long], [long, short]):
        alone = batch_of([short])
        padded = batch_of(order)
        row = order.index(short)
        assert (padded.source[row] == PAD_ID).sum() == 6  # the short sentence really is padded
        with torch.no_grad():
            expected, _ = model(alone.source, alone.target_in)
            got, _ = model(padded.source, padded.target_in)
        real = len(short[1]) + 1  # <bos> + target tokens
        assert torch.allclose(got[row, :real], expected[0], atol=1e-5)


@pytest.mark.parametrize(("name", "extra"), VARIANTS, ids=VARIANT_IDS)
def test_the_decoder_does_not_see_later_target_tokens(name, extra):
    model = tiny_seq2seq(name, **extra).eval()
    batch = batch_of(random_pairs([(6, 9), (4, 9)], seed=4))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        logits, _ = model(batch.source, batch.target_in)
        for t in (0, 2, 6):
            changed = batch.target_in.clone()
            changed[:, t + 1 :] = torch.randint(3, TGT_VOCAB, changed[:, t + 1 :].shape, generator=generator)
            other, _ = model(batch.source, changed)
            assert torch.equal(other[:, : t + 1], logits[:, : t + 1]), (
                f"position <= {t} saw a later target token"
            )
            assert not torch.allclose(other[:, t + 1 :], logits[:, t + 1 :])


@pytest.mark.parametrize(("name", "extra"), VARIANTS, ids=VARIANT_IDS)
def test_incremental_decoding_equals_teacher_forcing(name, extra):
    model = tiny_seq2seq(name, **extra).eval()
    batch = batch_of(random_pairs([(5, 7), (8, 3), (2, 5)], seed=6))
    src, tgt = batch.source, batch.target_in
    src_mask = src == PAD_ID
    with torch.no_grad():
        memory = model.encode(src, src_mask)
        full, _ = model.decode(tgt, memory, src_mask)
        state, steps = model.init_decode_state(memory, src_mask), []
        for t in range(tgt.shape[1]):
            logits, state = model.decode(tgt[:, t : t + 1], memory, src_mask, state)
            steps.append(logits)
        # A chunk, then single tokens.
        chunk, state = model.decode(tgt[:, :3], memory, src_mask, model.init_decode_state(memory, src_mask))
        rest = []
        for t in range(3, tgt.shape[1]):
            logits, state = model.decode(tgt[:, t : t + 1], memory, src_mask, state)
            rest.append(logits)
    assert full.shape == (3, tgt.shape[1], TGT_VOCAB)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert torch.allclose(torch.cat([chunk, *rest], dim=1), full, atol=1e-5)


@pytest.mark.parametrize(("name", "extra"), VARIANTS, ids=VARIANT_IDS)
def test_reorder_state_equals_decoding_reordered_inputs(name, extra):
    model = tiny_seq2seq(name, **extra).eval()
    batch = batch_of(random_pairs([(5, 6), (8, 6), (2, 6)], seed=7))
    src, tgt = batch.source, batch.target_in
    prefix = 3

    def decode_prefix(source, target):
        mask = source == PAD_ID
        memory = model.encode(source, mask)
        _, state = model.decode(target[:, :prefix], memory, mask, model.init_decode_state(memory, mask))
        return memory, mask, state

    # A permutation, and a selection with repeats (what beam search does when two beams share a parent).
    for order in ([2, 0, 1], [1, 1, 0]):
        index = torch.tensor(order)
        with torch.no_grad():
            memory, mask, state = decode_prefix(src, tgt)
            state = model.reorder_state(state, index)
            memory, mask = select_rows(memory, index), mask.index_select(0, index)
            got, state = model.decode(tgt[index, prefix : prefix + 1], memory, mask, state)
            got2, _ = model.decode(tgt[index, prefix + 1 : prefix + 2], memory, mask, state)

            memory, mask, state = decode_prefix(src[index], tgt[index])
            expected, state = model.decode(tgt[index, prefix : prefix + 1], memory, mask, state)
            expected2, _ = model.decode(tgt[index, prefix + 1 : prefix + 2], memory, mask, state)
        assert torch.allclose(got, expected, atol=1e-5), order
        assert torch.allclose(got2, expected2, atol=1e-5), order


# ---- greedy decoding and beam search --------------------------------------------------------------


def teacher_forced_logprobs(model, src: torch.Tensor, tokens: list[int], eos: int | None) -> float:
    """log P(tokens [+ eos] | src) computed with one teacher-forced forward pass."""
    out = tokens + ([eos] if eos is not None else [])
    with torch.no_grad():
        logits, _ = model(src, torch.tensor([[BOS] + out[:-1]]))
    logprobs = logits[0].float().log_softmax(-1)
    return float(logprobs[torch.arange(len(out)), torch.tensor(out)].sum())


@pytest.mark.parametrize("name", SEQ2SEQ_MODELS)
def test_greedy_decoding_follows_the_argmax_and_beam_1_equals_it(name):
    model = tiny_seq2seq(name, seed=8).eval()
    src = batch_of(random_pairs([(4, 1), (7, 1), (2, 1)], seed=9)).source
    max_len = 9
    # First with an <eos> that never comes: every row runs to max_len.
    unstopped = decode_batch(model, src, bos_id=BOS, eos_id=-1, max_len=max_len)
    assert [len(row) for row in unstopped] == [max_len] * 3
    # Then make row 0's third token the <eos>: row 0 stops before its first occurrence.
    eos = unstopped[0][2]
    greedy = decode_batch(model, src, bos_id=BOS, eos_id=eos, max_len=max_len)
    cut = unstopped[0].index(eos)
    assert greedy[0] == unstopped[0][:cut]
    for row in range(3):
        stop = unstopped[row].index(eos) if eos in unstopped[row] else max_len
        assert greedy[row] == unstopped[row][:stop]
    # Greedy is the argmax of the teacher-forced distribution at every step.
    for row, tokens in enumerate(greedy):
        finished = len(tokens) < max_len
        out = tokens + ([eos] if finished else [])
        with torch.no_grad():
            logits, _ = model(src[row : row + 1], torch.tensor([[BOS] + out[:-1]]))
        assert logits[0].argmax(-1).tolist() == out
    beams = beam_search(model, src, beam=1, bos_id=BOS, eos_id=eos, max_len=max_len)
    assert [hyps[0].tokens for hyps in beams] == greedy
    assert all(len(hyps) == 1 for hyps in beams)


@pytest.fixture(scope="module")
def half_trained():
    """name -> a model trained 30 steps on the copy task: input-dependent, varied hypotheses, real <eos>."""
    cache: dict[str, Seq2SeqModel] = {}

    def get(name: str) -> Seq2SeqModel:
        if name not in cache:
            sizes, lr, _ = LEARNING.get(name, ({}, 1e-2, 0))
            torch.manual_seed(0)
            model = build_model(tiny_model_section(name, **sizes), (TASK_VOCAB, TASK_VOCAB)).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
            data = torch.Generator().manual_seed(1)
            for _ in range(30):
                batch = batch_of(task_pairs("copy", 64, data))
                loss, _ = model(batch.source, batch.target_in, targets=batch.target_out)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            cache[name] = model.eval()
        return cache[name]

    return get


@pytest.mark.parametrize("name", SEQ2SEQ_MODELS)
@pytest.mark.parametrize("length_penalty", [1.0, 0.6])
def test_n_best_lists_are_sorted_and_scored(half_trained, name, length_penalty):
    model = half_trained(name)
    pairs = task_pairs("copy", 4, torch.Generator().manual_seed(5))
    src = batch_of(pairs).source
    max_len, beam, n_best = 5, 4, 3
    banned = (PAD_ID, BOS)
    results = beam_search(
        model,
        src,
        beam=beam,
        bos_id=BOS,
        eos_id=EOS,
        max_len=max_len,
        length_penalty=length_penalty,
        n_best=n_best,
        banned_ids=banned,
    )
    assert len(results) == 4
    lengths = set()
    for row, hyps in enumerate(results):
        assert len(hyps) == n_best
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == n_best  # distinct hypotheses
        for hyp in hyps:
            assert EOS not in hyp.tokens and not set(banned) & set(hyp.tokens)
            assert hyp.score == pytest.approx(hyp.logprob / (len(hyp.tokens) + 1) ** length_penalty, rel=1e-5)
            # The log-probability is the model's: log P(tokens <eos> | source), or of the tokens alone when
            # the hypothesis ran out of length.
            finished = len(hyp.tokens) < max_len
            lengths.add(len(hyp.tokens))
            real = src[row : row + 1, : int((src[row] != PAD_ID).sum())]
            expected = teacher_forced_logprobs(model, real, hyp.tokens, EOS if finished else None)
            assert hyp.logprob == pytest.approx(expected, abs=1e-4)
    assert max_len in lengths and len(lengths) > 1  # both finished and cut-off hypotheses were checked
    # beam 1 is greedy decoding here too, and n_best is capped by the beam width.
    greedy = decode_batch(model, src, bos_id=BOS, eos_id=EOS, max_len=max_len)
    assert [
        h[0].tokens for h in beam_search(model, src, beam=1, bos_id=BOS, eos_id=EOS, max_len=max_len)
    ] == greedy
    capped = beam_search(model, src, beam=2, bos_id=BOS, eos_id=EOS, max_len=max_len, n_best=5)
    assert [len(h) for h in capped] == [2] * 4
    # Each sentence gets the same hypotheses in a padded batch as alone.
    for row, hyps in enumerate(results):
        real = src[row : row + 1, : int((src[row] != PAD_ID).sum())]
        [own] = beam_search(
            model,
            real,
            beam=beam,
            bos_id=BOS,
            eos_id=EOS,
            max_len=max_len,
            length_penalty=length_penalty,
            n_best=n_best,
            banned_ids=banned,
        )
        assert [h.tokens for h in own] == [h.tokens for h in hyps]
        assert [h.score for h in own] == pytest.approx([h.score for h in hyps], abs=1e-5)


@pytest.mark.parametrize("name", SEQ2SEQ_MODELS)
def test_sampling_and_streaming_agree_with_greedy(half_trained, name):
    model = half_trained(name)
    src = batch_of(task_pairs("reverse", 5, torch.Generator().manual_seed(7))).source
    greedy = decode_batch(model, src, bos_id=BOS, eos_id=EOS, max_len=8)
    top1 = SamplingOptions(temperature=1.0, top_k=1)  # sampling from one candidate is greedy
    assert (
        decode_batch(
            model,
            src,
            bos_id=BOS,
            eos_id=EOS,
            max_len=8,
            options=top1,
            generator=torch.Generator().manual_seed(0),
        )
        == greedy
    )
    hot = SamplingOptions(temperature=2.0)
    first = decode_batch(
        model, src, bos_id=BOS, eos_id=EOS, max_len=8, options=hot, generator=torch.Generator().manual_seed(1)
    )
    again = decode_batch(
        model, src, bos_id=BOS, eos_id=EOS, max_len=8, options=hot, generator=torch.Generator().manual_seed(1)
    )
    assert first == again and first != greedy  # reproducible with a seeded generator, and really sampled
    for row in range(src.shape[0]):
        real = src[row : row + 1, : int((src[row] != PAD_ID).sum())]
        sequence = SequenceDecoder(SamplingOptions(greedy=True, max_new_tokens=8), end_ids=(EOS,))
        streamed = [step.id for step in run_decoder(Seq2SeqStepper(model, real, BOS), sequence)]
        assert streamed == greedy[row]


@pytest.mark.parametrize("name", SEQ2SEQ_MODELS)
def test_corpus_translation_in_batches_equals_one_sentence_at_a_time(half_trained, name):
    model = half_trained(name)
    tokenizer = CharTokenizer.fit("abcdefghi")
    assert tokenizer.vocab_size == TASK_VOCAB
    sources = ["abc", "abcdefg", "ba", "ihgfedc", "eee", "hi", "gfedcba"]
    for beam in (1, 3):
        batched = translate_corpus(
            model,
            sources,
            tokenizer,
            tokenizer,
            max_len=8,
            beam=beam,
            batch_size=3,
            device=torch.device("cpu"),
        )
        alone = [translate(model, tokenizer, tokenizer, text, max_len=8, beam=beam)[0][0] for text in sources]
        assert batched == alone
    assert len(set(batched)) > 1  # the outputs depend on the input
    # A source longer than max_len is translated from its first max_len - 1 tokens (+ <eos>).
    long = "ihgfedcbaab"
    [cut] = translate_corpus(model, [long], tokenizer, tokenizer, max_len=8, device=torch.device("cpu"))
    assert cut == translate(model, tokenizer, tokenizer, long[:7], max_len=8)[0][0]
    assert cut == translate(model, tokenizer, tokenizer, long, max_len=8)[0][0] or model.max_source_len != 8


@pytest.mark.parametrize("name", SEQ2SEQ_MODELS)
def test_evaluation_loss_is_the_token_weighted_mean(half_trained, name):
    model = half_trained(name)
    pairs = task_pairs("reverse", 10, torch.Generator().manual_seed(6))
    batches = pair_batches(pairs, 4, seed=0, bos_id=BOS, eos_id=EOS, shuffle=False)
    metrics = evaluate_seq2seq(model, batches, device=torch.device("cpu"))
    total, tokens = 0.0, 0
    for src, tgt in pairs:  # one pair at a time: no padding anywhere
        with torch.no_grad():
            logits, _ = model(torch.tensor([src]), torch.tensor([[BOS] + tgt]))
        total += float(F.cross_entropy(logits[0], torch.tensor(tgt + [EOS]), reduction="sum"))
        tokens += len(tgt) + 1
    assert metrics["tokens"] == tokens
    assert metrics["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert metrics["ppl"] == pytest.approx(math.exp(total / tokens), rel=1e-5)


# ---- parallel and TSV files -----------------------------------------------------------------------


def write_parallel(tmp_path, sources: list[str], targets: list[str], prefix: str = "train") -> str:
    base = tmp_path / prefix
    (tmp_path / f"{prefix}.src").write_text("".join(s + "\n" for s in sources), encoding="utf-8")
    (tmp_path / f"{prefix}.tgt").write_text("".join(t + "\n" for t in targets), encoding="utf-8")
    return str(base)


def parallel_config(prefix: str, **extra) -> DataConfig:
    return DataConfig.model_validate({"format": "parallel", "train": prefix, **extra})


def test_parallel_files_are_read_as_aligned_pairs(tmp_path):
    sources = [f"quelle {i}" for i in range(20)]
    targets = [f"  target {i} " for i in range(20)]
    prefix = write_parallel(tmp_path, sources, targets)
    config = parallel_config(prefix, split=(0.8, 0.1, 0.1))
    pairs = read_pair_file(config, prefix)
    assert pairs == [(f"quelle {i}", f"target {i}") for i in range(20)]
    splits = ExampleSplits(config)
    assert [splits.split(name) for name in ("train", "val", "test")] == [pairs[:16], pairs[16:18], pairs[18:]]


def test_only_newlines_end_sentences(tmp_path):
    """Unicode line separators, NEL and form feeds inside a sentence do not split it (str.splitlines would)."""
    sources = ["one", "two\u2028halves", "three\x85four", "page\x0cbreak"]
    targets = ["eins", "zwei", "drei", "vier"]
    prefix = write_parallel(tmp_path, sources, targets)
    assert read_pair_file(parallel_config(prefix), prefix) == list(zip(sources, targets, strict=True))
    path = tmp_path / "pairs.tsv"
    path.write_text("a\u2028b\tc\nd\x0ce\tf\nno tab here\n", encoding="utf-8")
    config = DataConfig.model_validate({"format": "tsv", "train": str(path)})
    with pytest.raises(DataError, match=r"line 3: expected 'source<TAB>target', got 'no tab here'"):
        read_pair_file(config, str(path))


def test_misaligned_parallel_files_are_one_error_naming_both(tmp_path):
    prefix = write_parallel(tmp_path, ["a", "b", "c"], ["x", "y", "z", "w"])
    with pytest.raises(DataError) as err:
        read_pair_file(parallel_config(prefix), prefix)
    message = str(err.value)
    assert "\n" not in message
    assert f"{prefix}.src" in message and f"{prefix}.tgt" in message
    assert "3 lines" in message and "4" in message


@pytest.mark.parametrize("side", ["src", "tgt"])
def test_an_empty_line_in_a_parallel_file_names_its_line(tmp_path, side):
    sources, targets = ["a", "b", "c", "d"], ["w", "x", "y", "z"]
    (sources if side == "src" else targets)[2] = "   "
    prefix = write_parallel(tmp_path, sources, targets)
    with pytest.raises(DataError) as err:
        read_pair_file(parallel_config(prefix), prefix)
    message = str(err.value)
    assert "\n" not in message and f"{prefix}.{side} line 3" in message and "empty" in message


def test_a_malformed_tsv_line_names_its_line(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("eins\tone\nzwei\ttwo\n\ndrei three\nvier\tfour\n", encoding="utf-8")
    config = DataConfig.model_validate({"format": "tsv", "train": str(path)})
    with pytest.raises(DataError) as err:
        read_pair_file(config, str(path))
    message = str(err.value)
    assert "\n" not in message and f"{path} line 4" in message and "drei three" in message
    for bad in ("a\tb\tc", "a\t ", "\tb"):
        path.write_text(f"eins\tone\n{bad}\n", encoding="utf-8")
        with pytest.raises(DataError, match="line 2"):
            read_pair_file(config, str(path))
    path.write_text("eins\tone\n\nzwei \t two\n", encoding="utf-8")  # blank lines are skipped
    assert read_pair_file(config, str(path)) == [("eins", "one"), ("zwei", "two")]


def test_pairs_longer_than_max_len_are_skipped_and_collated():
    class Chars:
        eos_id = EOS

        def encode(self, text):
            return [ord(c) - ord("a") + 3 for c in text]

    encoded = encode_pairs([("ab", "cde"), ("abcdef", "a"), ("a", "abcdef")], Chars(), Chars(), max_len=5)
    assert encoded == [([3, 4, EOS], [5, 6, 7])]
    batch = collate_pairs(encoded + [([3, EOS], [4])], bos_id=BOS, eos_id=EOS)
    assert batch.source.tolist() == [[3, 4, EOS], [3, EOS, 0]]
    assert batch.target_in.tolist() == [[BOS, 5, 6, 7], [BOS, 4, 0, 0]]
    assert batch.target_out.tolist() == [[5, 6, 7, EOS], [4, EOS, 0, 0]]


def test_share_embeddings_with_two_vocabularies_is_a_config_error():
    for name in SEQ2SEQ_MODELS:
        if "share_embeddings" in get_model_info(name).config.model_fields:
            with pytest.raises(ConfigError, match="share_embeddings"):
                build_model(tiny_model_section(name, share_embeddings=True), (SRC_VOCAB, TGT_VOCAB))


# ---- tiny tasks are learned -----------------------------------------------------------------------

TASK_VOCAB = 13  # pad, bos, eos + 10 symbols
LEARNING = {  # per family: model size overrides, peak learning rate, step budget (batches of 64)
    "seq2seq": ({}, 2e-2, 200),  # about 100-150 steps needed, 2-3 s on one CPU thread
    "transformer": ({"d_model": 32, "d_ff": 64, "n_heads": 4}, 5e-3, 250),  # about 150 steps, 4-5 s
}


def task_pairs(task: str, count: int, generator: torch.Generator) -> list[tuple[list[int], list[int]]]:
    """`count` random sequences of 3-6 symbols (+ <eos>) and their copies or reversals."""
    lengths = torch.randint(3, 7, (count,), generator=generator).tolist()
    symbols = torch.randint(3, TASK_VOCAB, (count, 6), generator=generator).tolist()
    pairs = []
    for length, row in zip(lengths, symbols, strict=True):
        seq = row[:length]
        pairs.append((seq + [EOS], seq if task == "copy" else seq[::-1]))
    return pairs


def token_accuracy(model, pairs) -> float:
    """Greedy decoding of held-out sources: matching tokens / max(reference, output) length, summed."""
    was_training = model.training
    model.eval()
    outputs = decode_batch(model, batch_of(pairs).source, bos_id=BOS, eos_id=EOS, max_len=10)
    model.train(was_training)
    correct = sum(
        sum(a == b for a, b in zip(out, ref, strict=False))
        for out, (_, ref) in zip(outputs, pairs, strict=True)
    )
    return correct / sum(max(len(out), len(ref)) for out, (_, ref) in zip(outputs, pairs, strict=True))


@pytest.mark.parametrize("task", ["copy", "reverse"])
@pytest.mark.parametrize("name", sorted(LEARNING))
def test_a_tiny_task_is_learned(name, task):
    sizes, lr, budget = LEARNING[name]
    torch.manual_seed(0)
    model = build_model(tiny_model_section(name, **sizes), (TASK_VOCAB, TASK_VOCAB)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = TrainConfig(lr=lr, min_lr=lr / 10, warmup_steps=20)
    data = torch.Generator().manual_seed(1)
    training = [task_pairs(task, 64, data) for _ in range(budget)]
    seen = {tuple(src) for pairs in training for src, _ in pairs}
    # Held out: sequences that no training batch contains.
    monitor = [p for p in task_pairs(task, 200, torch.Generator().manual_seed(2)) if tuple(p[0]) not in seen][
        :64
    ]
    held_out = [
        p for p in task_pairs(task, 400, torch.Generator().manual_seed(3)) if tuple(p[0]) not in seen
    ][:200]
    assert len(monitor) == 64 and len(held_out) == 200
    before = token_accuracy(model, held_out)
    for step in range(budget):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule, budget)
        batch = batch_of(training[step])
        loss, _ = model(batch.source, batch.target_in, targets=batch.target_out)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 25 == 0 and token_accuracy(model, monitor) >= 0.99:  # learned: stop early
            break
    accuracy = token_accuracy(model, held_out)
    assert before < 0.3 and math.isfinite(loss.item())
    assert accuracy >= 0.95, f"{name} learned {task} to {accuracy:.3f} token accuracy in {step + 1} steps"
    # On a trained model (which does emit <eos>), beam 1 is still exactly greedy.
    model.eval()
    src = batch_of(held_out[:16]).source
    greedy = decode_batch(model, src, bos_id=BOS, eos_id=EOS, max_len=10)
    assert [
        h[0].tokens for h in beam_search(model, src, beam=1, bos_id=BOS, eos_id=EOS, max_len=10)
    ] == greedy
    # A wider beam ranking by plain log-probability (length_penalty 0): its best hypothesis is at least as
    # likely under the model as greedy's output, sentence by sentence, and at least as accurate.
    wide = [
        h[0].tokens
        for h in beam_search(model, src, beam=3, bos_id=BOS, eos_id=EOS, max_len=10, length_penalty=0.0)
    ]
    for row, (mine, theirs) in enumerate(zip(wide, greedy, strict=True)):
        real = src[row : row + 1, : int((src[row] != PAD_ID).sum())]
        logprob = [
            teacher_forced_logprobs(model, real, t, EOS if len(t) < 10 else None) for t in (mine, theirs)
        ]
        assert logprob[0] >= logprob[1] - 1e-5, (row, mine, theirs, logprob)
    references = [ref for _, ref in held_out[:16]]
    exact = [sum(out == ref for out, ref in zip(outs, references, strict=True)) for outs in (wide, greedy)]
    assert exact[0] >= exact[1] and exact[0] >= 14, exact
