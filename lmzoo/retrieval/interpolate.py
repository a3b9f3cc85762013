"""kNN-LM interpolation: p = (1 - lambda) p_LM + lambda p_kNN (Khandelwal et al., ICLR 2020).

p_kNN(w) is proportional to the sum of exp(-d / T) over the k stored neighbours of the current hidden
state whose value is w (d: squared L2 distance). Everything is computed in log space: the neighbour
scores are shifted by their maximum before exponentiating, and the mixture is a logaddexp.

The mixture lives in an output head (`KnnHead`): it reads the same hidden state the model's own head
reads, which is also the datastore's query. `KnnLM` is the model with that head, so evaluation
(`lmzoo.inference.evaluate.evaluate_lm`), scoring and generation (`lmzoo.inference.decoding`, one datastore query per
generated token) run unchanged. lambda = 0 is the plain model's own head: the same loss, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmzoo.errors import ConfigError
from lmzoo.inference.loaded import LoadedModel
from lmzoo.models.base import DecodingSlots, LanguageModel
from lmzoo.models.heads import OutputHead
from lmzoo.retrieval.knn import Datastore
from lmzoo.run import Run


def check_knn_options(k: int, lmbda: float, temperature: float) -> None:
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}", param="k")
    if not 0.0 <= lmbda <= 1.0:
        raise ConfigError(f"lmbda must be between 0 and 1, got {lmbda}", param="lmbda")
    if not temperature > 0 or not math.isfinite(temperature):
        raise ConfigError(f"temperature (kNN) must be > 0, got {temperature}", param="temperature")


def neighbour_scores(distances: torch.Tensor, values: torch.Tensor, temperature: float) -> torch.Tensor:
    """-d / T per neighbour, -inf where the index returned no neighbour (value -1)."""
    scores = -distances.double() / temperature
    return scores.masked_fill(values < 0, float("-inf"))


def knn_logprobs(
    distances: torch.Tensor, values: torch.Tensor, vocab: int, temperature: float
) -> torch.Tensor:
    """log p_kNN over the whole vocabulary, (N, V) float64, from (N, k) distances and values."""
    scores = neighbour_scores(distances, values, temperature)
    top = scores.max(-1, keepdim=True).values  # the nearest neighbour: weight exp(0) = 1
    weights = (scores - top).exp()
    mass = torch.zeros(len(scores), vocab, dtype=torch.float64).scatter_add_(1, values.clamp(min=0), weights)
    return mass.log() - weights.sum(-1, keepdim=True).log()


def knn_target_logprob(scores: torch.Tensor, values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p_kNN(target) (N,) from neighbour scores (N, k): logsumexp over matching neighbours minus over all."""
    matching = scores.masked_fill(values != targets[:, None], float("-inf"))
    return torch.logsumexp(matching, -1) - torch.logsumexp(scores, -1)


def mix(lm_logp: torch.Tensor, knn_logp: torch.Tensor, lmbda: float) -> torch.Tensor:
    """log((1 - lambda) p_LM + lambda p_kNN), in log space."""
    if lmbda <= 0.0:
        return lm_logp
    if lmbda >= 1.0:
        return knn_logp
    return torch.logaddexp(lm_logp + math.log1p(-lmbda), knn_logp + math.log(lmbda))


class KnnHead(nn.Module):
    """The model's output head mixed with a datastore: `logits` gives interpolated log-probabilities."""

    def __init__(
        self, head: OutputHead, store: Datastore, *, k: int, lmbda: float, temperature: float
    ) -> None:
        super().__init__()
        check_knn_options(k, lmbda, temperature)
        store.check_k(k)
        self.base = head
        self.store, self.k, self.lmbda, self.temperature = store, k, lmbda, temperature

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Interpolated log-probabilities (..., V) (the base head's logits when lambda is 0)."""
        lm = self.base.logits(h)
        if self.lmbda == 0.0:
            return lm
        lm_logp = lm.float().log_softmax(-1).reshape(-1, lm.shape[-1])
        distances, values = self.store.search(h, self.k)
        knn = knn_logprobs(distances, values, lm.shape[-1], self.temperature).to(lm_logp.device)
        return mix(lm_logp.double(), knn, self.lmbda).float().view(lm.shape)

    def loss(
        self,
        h: torch.Tensor,
        targets: torch.Tensor,
        *,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """Mean interpolated NLL of `targets` (the base head's own loss when lambda is 0)."""
        if self.lmbda == 0.0:
            return self.base.loss(h, targets, ignore_index=ignore_index, label_smoothing=label_smoothing)
        if label_smoothing:
            raise ConfigError("label smoothing is a training option; kNN-LM evaluates without it")
        flat_t = targets.reshape(-1)
        lm_logp = self.base.logits(h).float().log_softmax(-1).reshape(-1, self.base.vocab_size)
        lm_t = lm_logp.gather(1, flat_t.clamp(min=0)[:, None]).squeeze(1).double()
        distances, values = self.store.search(h, self.k)
        scores = neighbour_scores(distances, values, self.temperature)
        knn_t = knn_target_logprob(scores, values, flat_t.cpu()).to(lm_t.device)
        nll = -mix(lm_t, knn_t, self.lmbda)
        keep = flat_t != ignore_index
        return (nll[keep].sum() / keep.sum().clamp(min=1)).float()

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size


class KnnLM(LanguageModel):
    """A frozen language model whose output head is mixed with a datastore; the same LanguageModel
    contract (forward(ids, state) -> (log-probs, state), hidden, head, init_state), so generation,
    evaluation and scoring use it as they use any model."""

    def __init__(
        self, model: LanguageModel, store: Datastore, *, k: int, lmbda: float, temperature: float
    ) -> None:
        super().__init__()
        self.model = model
        # the head the contract names: KnnHead answers logits, loss and vocab_size as an OutputHead does
        self.head = KnnHead(model.head, store, k=k, lmbda=lmbda, temperature=temperature)  # type: ignore[assignment]
        self.carries_state = model.carries_state

    @property
    def context_len(self) -> int | None:
        return self.model.context_len

    def init_state(self, batch_size: int) -> Any:
        return self.model.init_state(batch_size)

    def decoding_slots(self, capacity: int) -> DecodingSlots:
        return self.model.decoding_slots(capacity)  # the same features; the head mixes in the store

    def hidden(self, ids: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        return self.model.hidden(ids, state)


class KnnRun(Run):
    """A run whose every next-token distribution is mixed with a kNN-LM datastore (`lmzoo index`).

    It is the same run (directory, config, tokenizers, base) with another `load`: the model it hands
    out is `KnnLM`, so evaluate, score and generate behave exactly as for the plain run, with the
    mixture in place (lambda = 0: the same numbers). `plain` is the run without the store.
    """

    def __init__(self, run: Run, index_dir: str | Path, *, k: int, lmbda: float, temperature: float) -> None:
        if run.kind != "lm":
            raise ConfigError(f"{run.path} is a seq2seq run; kNN-LM works with language models")
        check_knn_options(k, lmbda, temperature)
        super().__init__(run.path, run.config)
        self.__dict__.update({k_: v for k_, v in run.__dict__.items() if k_ != "_loaded"})  # base, tokenizers
        self.plain, self.index_dir = run, Path(index_dir)
        self.k, self.lmbda, self.temperature = k, lmbda, temperature
        self._stores = {"best": Datastore.load(index_dir, run, "best")}  # refused now, not at the first token
        self._stores["best"].check_k(k)

    def __repr__(self) -> str:
        knn = f"k={self.k}, lmbda={self.lmbda}, T={self.temperature}"
        return f"KnnRun({str(self.path)!r}, index={str(self.index_dir)!r}, {knn})"

    def retune(self, lmbda: float, temperature: float) -> None:
        """Change lambda and T (the store stays loaded; mixed models are rebuilt on next use)."""
        check_knn_options(self.k, lmbda, temperature)
        self.lmbda, self.temperature = lmbda, temperature
        self._loaded.clear()

    def store(self, checkpoint_tag: str = "best") -> Datastore:
        if checkpoint_tag not in self._stores:
            self._stores[checkpoint_tag] = Datastore.load(self.index_dir, self.plain, checkpoint_tag)
        return self._stores[checkpoint_tag]

    def load(self, checkpoint_tag: str = "best", device: torch.device | str = "auto") -> LoadedModel:
        """The plain run's model for this checkpoint, with its output mixed with the datastore."""
        plain = self.plain.load(checkpoint_tag, device)
        key = (checkpoint_tag, str(plain.device))
        if key not in self._loaded:
            mixed = KnnLM(
                plain.language_model,
                self.store(checkpoint_tag),
                k=self.k,
                lmbda=self.lmbda,
                temperature=self.temperature,
            )
            self._loaded[key] = replace(plain, model=mixed.eval())
        return self._loaded[key]


def with_knn(
    run: Run, index: str | Path, *, k: int = 1024, lmbda: float = 0.25, temperature: float = 1.0
) -> KnnRun:
    """`run` mixed with the kNN-LM datastore at `index`: p = (1 - lmbda) p_LM + lmbda p_kNN."""
    return KnnRun(run, index, k=k, lmbda=lmbda, temperature=temperature)
