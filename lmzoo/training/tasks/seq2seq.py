"""Translation: sentence pairs, length-bucketed (or token-count) batches, teacher-forced loss and BLEU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmzoo.data.encoders import id_dtype
from lmzoo.data.example_files import ExampleSplits
from lmzoo.data.examples import encode_pairs, iter_encoded_pairs, pair_batches
from lmzoo.data.packed import PackedExamples
from lmzoo.data.tokenizer import Tokenizer, fit_tokenizer
from lmzoo.errors import ConfigError
from lmzoo.inference.evaluate import corpus_bleu, evaluate_seq2seq, translate_corpus
from lmzoo.models.base import Seq2SeqModel
from lmzoo.training.objectives import Seq2SeqObjective
from lmzoo.training.tasks.base import BatchSource, Metrics, Task, TaskContext


def seq2seq_task(context: TaskContext) -> Task:
    config = context.config
    splits = ExampleSplits(config.data)  # counted once; each split then streams from the files
    source_tok, target_tok = _pair_tokenizers(context, splits)
    max_len = config.data.max_len
    bos, eos = target_tok.bos_id, target_tok.eos_id
    dtype = id_dtype(max(source_tok.vocab_size, target_tok.vocab_size))
    encoded = iter_encoded_pairs(splits.stream("train"), source_tok, target_tok, max_len=max_len)
    train_pairs = PackedExamples.of(encoded, 2, dtype=dtype)  # a few bytes per token
    batches = _pair_training_batches(context, train_pairs, bos, eos)  # fails before the model is built
    val = splits.split("val")
    val_batches = pair_batches(
        encode_pairs(val, source_tok, target_tok, max_len=max_len),
        context.eval_batch_size,
        seed=0,
        shuffle=False,
        name="validation",
        bos_id=bos,
        eos_id=eos,
    )
    model = context.make_model((source_tok.vocab_size, target_tok.vocab_size))
    if not isinstance(model, Seq2SeqModel):
        raise ConfigError(f"model {config.model.name!r} is not a seq2seq model; sentence pairs need one")
    evaluate = _evaluator(
        context, model, val_batches, val[: config.train.bleu_sentences], source_tok, target_tok
    )

    def sample(step: int) -> str:
        from lmzoo.inference.seq2seq import translate

        source, reference = val[0]
        [(hyp, _)] = context.in_eval_mode(
            model, lambda: [translate(model, source_tok, target_tok, source, max_len=max_len)[0]]
        )
        return f"{source}\n-> {hyp}\n(reference: {reference})"

    tokens = int(train_pairs.lengths(1).sum()) + len(train_pairs)
    return Task(
        tokenizer=source_tok,
        target_tokenizer=target_tok,
        model=model,
        batches=batches,
        objective=Seq2SeqObjective(label_smoothing=config.train.label_smoothing),
        tokens_per_epoch=tokens,
        evaluate=evaluate,
        sample=sample,
    )


def _evaluator(
    context: TaskContext,
    model: Seq2SeqModel,
    val_batches: Any,
    bleu_pairs: list[tuple[str, str]],
    source_tok: Tokenizer,
    target_tok: Tokenizer,
) -> Callable[[], Metrics]:
    """Validation loss, and BLEU of greedy translations of `bleu_pairs`; `best` by loss or by BLEU."""
    config = context.config

    def evaluate() -> Metrics:
        values = evaluate_seq2seq(
            model,
            val_batches,
            device=context.device,
            precision=context.precision,
            max_batches=config.train.eval_batches,
        )
        if bleu_pairs:
            hyps = context.in_eval_mode(
                model,
                lambda: translate_corpus(
                    model,
                    [s for s, _ in bleu_pairs],
                    source_tok,
                    target_tok,
                    max_len=config.data.max_len,
                    device=context.device,
                ),
            )
            values["bleu"] = corpus_bleu(hyps, [t for _, t in bleu_pairs])
        by_bleu = config.train.best_metric == "bleu"
        return Metrics(values, key="bleu" if by_bleu else "loss", higher_is_better=by_bleu)

    return evaluate


def _pair_training_batches(context: TaskContext, pairs: PackedExamples, bos: int, eos: int) -> BatchSource:
    """Training pairs by token count (data.max_tokens: collated once, kept on the device) or by rows."""
    config = context.config
    if config.data.max_tokens is None:
        return pair_batches(pairs, context.batch_size, seed=config.seed, bos_id=bos, eos_id=eos)
    from lmzoo.data.token_batches import TokenBatches

    return TokenBatches(
        pairs, config.data.max_tokens, seed=config.seed, device=context.device, bos_id=bos, eos_id=eos
    )


def _pair_tokenizers(context: TaskContext, splits: ExampleSplits) -> tuple[Tokenizer, Tokenizer]:
    """(source, target) tokenizers: saved ones, one shared tokenizer, or one per side (fitted on a bounded
    sample of the pairs: all of them, up to tokenizer.fit_bytes of files)."""
    if context.tokenizers is not None:
        source = context.tokenizers["source"]
        return source, context.tokenizers.get("target", source)
    tokenizer = context.config.tokenizer
    wanted = {"train", "val", "test"} if tokenizer.fit_on == "all" else {"train"}
    fit_pairs = splits.sample(wanted, tokenizer.fit_bytes)
    sources, targets = "\n".join(s for s, _ in fit_pairs), "\n".join(t for _, t in fit_pairs)
    config = context.config
    if config.target_tokenizer is None:
        shared = fit_tokenizer(config.tokenizer, sources + "\n" + targets)
        return shared, shared
    return fit_tokenizer(config.tokenizer, sources), fit_tokenizer(config.target_tokenizer, targets)
