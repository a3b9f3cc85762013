"""Language modelling on text: a prepared corpus (tokenized once, memory-mapped), sequential
(state-carrying) or random-window batches read from it."""

from __future__ import annotations

from lmzoo.config.schema import RunConfig
from lmzoo.data.streams import make_batches
from lmzoo.inference.scoring import evaluate_stream
from lmzoo.models import get_model_info
from lmzoo.models.base import LanguageModel
from lmzoo.training.objectives import LMObjective
from lmzoo.training.tasks.base import Metrics, Task, TaskContext


def lm_task(context: TaskContext) -> Task:
    config = context.config
    corpus = context.corpus()
    tokenizer = corpus.tokenizer
    train_stream, val_stream = corpus.tokens("train"), corpus.tensor("val")
    seq_len = config.data.seq_len = config.seq_len
    # Batches before the model: a corpus too short for one batch fails before anything is built.
    carries_state = _carries_state(config)
    sequential = config.data.sampling == "sequential" or (config.data.sampling == "auto" and carries_state)
    batches = make_batches(
        train_stream,
        context.batch_size,
        seq_len,
        sequential=sequential,
        seed=config.seed,
        device=context.device,
    )
    model = context.make_model(tokenizer.vocab_size)

    readable = context.loaded(model, tokenizer, seq_len)

    def evaluate() -> Metrics:
        return Metrics(evaluate_stream(readable, val_stream, max_tokens=config.eval_tokens))

    objective = LMObjective(carry=carries_state and sequential, label_smoothing=config.train.label_smoothing)
    return Task(
        tokenizer=tokenizer,
        target_tokenizer=None,
        model=model,
        batches=batches,
        objective=objective,
        tokens_per_epoch=len(train_stream),
        evaluate=evaluate,
        sample=context.sampler(model, tokenizer, config.sample.prompt),
    )


def _carries_state(config: RunConfig) -> bool:
    family = get_model_info(config.model.name).cls
    return issubclass(family, LanguageModel) and family.carries_state
