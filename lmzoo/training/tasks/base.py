"""The task contract: typed batch sources and objectives, `Metrics` that say which value picks `best`,
and the `TaskContext` every task builder starts from."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from lmzoo.config.schema import DataConfig, RunConfig, TokenizerConfig
from lmzoo.data.tokenizer import Tokenizer, fit_tokenizer
from lmzoo.device import autocast
from lmzoo.inference.decoding import decode
from lmzoo.inference.loaded import LoadedModel
from lmzoo.inference.sampling import SamplingOptions
from lmzoo.models.base import ZooModel, eval_mode
from lmzoo.training.distributed import SINGLE, DistContext, main_first

if TYPE_CHECKING:
    from lmzoo.data.prepare import PreparedCorpus


class BatchSource(Protocol):
    """Training batches: `next()` forever (epochs wrap), a position to save and restore, batches per epoch."""

    def next(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def __len__(self) -> int: ...


class Objective(Protocol):
    """batch -> (loss, target tokens); state that flows between batches is saved with the run."""

    def __call__(self, forward: Any, batch: Any) -> tuple[torch.Tensor, int]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Metrics:
    """Validation values, and which of them picks the best checkpoint, in which direction."""

    values: dict[str, float]
    key: str = "loss"
    higher_is_better: bool = False

    @property
    def score(self) -> float:
        return self.values[self.key]

    def improves_on(self, best: float | None) -> bool:
        if best is None or math.isnan(best):
            return True
        return self.score > best if self.higher_is_better else self.score < best


class ModelFactory(Protocol):
    def __call__(self, vocab_size: int | tuple[int, int]) -> ZooModel: ...


@dataclass
class Task:
    tokenizer: Tokenizer  # the source side for seq2seq
    target_tokenizer: Tokenizer | None  # seq2seq only (the same object when shared)
    model: ZooModel
    batches: BatchSource
    objective: Objective
    tokens_per_epoch: int
    evaluate: Callable[[], Metrics]
    sample: Callable[[int], str]  # a short text for TensorBoard at a step
    # trained beside the model but not part of its weights (PPO's value head): optimised with it; the
    # objective saves it with its state
    auxiliary: torch.nn.Module | None = None

    @property
    def trained(self) -> torch.nn.Module:
        """What the optimiser updates: the model, with the auxiliary module when there is one."""
        if self.auxiliary is None:
            return self.model
        return torch.nn.ModuleList([self.model, self.auxiliary])


@dataclass
class TaskContext:
    """What every task builder needs: the config, where to run, how to get the model and tokenizers."""

    config: RunConfig
    device: torch.device
    precision: str
    make_model: ModelFactory  # the run's starting model for a vocabulary size (lmzoo.run.Run.initial_model)
    tokenizers: dict[str, Tokenizer] | None  # reused from a run directory instead of fitted
    batch_size: int  # per-step rows: data.batch_size x the number of processes sharing them
    base_config: RunConfig | None = None  # fine-tunes: the init_from run's config
    dist: DistContext = SINGLE
    progress: bool = False  # show progress bars while a corpus is prepared
    say: Callable[[str], None] | None = None  # where notices go (stderr by default)

    @property
    def eval_batch_size(self) -> int:
        return self.config.data.eval_rows

    def tokenizer(self, text: Callable[[], str], section: Any = None) -> Tokenizer:
        """The saved tokenizer, or one fitted on `text()` (read only when fitting)."""
        if self.tokenizers is not None:
            return self.tokenizers["source"]
        return fit_tokenizer(section or self.config.tokenizer, text())

    def corpus(
        self, data: DataConfig | None = None, tokenizer: Tokenizer | TokenizerConfig | None = None
    ) -> PreparedCorpus:
        """A text corpus (the run's by default) tokenized once into memory-mapped token files, with the saved
        tokenizer or one fitted on it. Under torchrun rank 0 prepares while the others wait; then every
        rank maps the same files."""
        from lmzoo.data.prepare import prepare_corpus

        data = data or self.config.data
        if tokenizer is None:
            tokenizer = self.tokenizers["source"] if self.tokenizers is not None else self.config.tokenizer

        def prepare(reuse_only: bool) -> PreparedCorpus:
            show = self.progress and not reuse_only
            say = (
                self.say
                if not self.dist.enabled
                else lambda m: print(f"rank {self.dist.rank}: {m}", file=sys.stderr)
            )
            return prepare_corpus(data, tokenizer, progress=show, say=say, reuse_only=reuse_only)

        return main_first(self.dist, lambda: prepare(False), lambda: prepare(True))

    def loaded(self, model: ZooModel, tokenizer: Tokenizer, window: int) -> LoadedModel:
        """The model in training as the inference core reads it (scored in `window`-token windows)."""
        return LoadedModel(
            model, tokenizer, precision=self.precision, window=window, batch_size=self.eval_batch_size
        )

    def autocast(self) -> Any:
        """The training precision's autocast context on the run's device."""
        return autocast(self.device, self.precision)

    def in_eval_mode(self, model: torch.nn.Module, make: Callable[[], Any]) -> Any:
        with eval_mode(model), autocast(self.device, self.precision):
            return make()

    def sampler(
        self, model: ZooModel, tokenizer: Tokenizer, prompt: str, **extra: Any
    ) -> Callable[[int], str]:
        """A short sample for TensorBoard, from its own generator so training randomness is untouched."""
        sample = self.config.sample
        options = SamplingOptions(
            max_new_tokens=min(sample.max_new_tokens, 200),
            temperature=sample.temperature,
            top_k=sample.top_k,
            top_p=sample.top_p,
            repetition_penalty=sample.repetition_penalty,
            **extra,
        )

        def make(step: int) -> str:
            lm = LoadedModel(model, tokenizer)
            seed = self.config.seed + step
            return prompt + self.in_eval_mode(model, lambda: decode(lm, prompt, options, seed=seed).text())

        return make
