"""The MCP tools: typed coroutines whose signatures become the tools' JSON schemas, over a RunRegistry.

`generate` goes to the run's decoding engine like /v1/completions; the other tools that touch a model
run under the run's lock in a worker thread, with the same limits and timeout as the HTTP API;
list_runs and describe_run read only configs and checkpoint metadata.
A request problem (an unknown run, a value over a limit) comes back as the tool's error message.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from pydantic import BaseModel, Field, ValidationError

from lmzoo.serve.errors import APIError
from lmzoo.serve.runs import RunRegistry

if TYPE_CHECKING:
    from lmzoo.retrieval.bm25 import Bm25Index

T = TypeVar("T")
RunName = Annotated[str, Field(description="A run's name, as list_runs gives it")]
Source = Annotated[str | None, Field(description="seq2seq runs: the source sentence")]


class RunSummary(BaseModel):
    name: str
    kind: str = Field(description="lm (a language model) or seq2seq (a translation model)")
    family: str
    tokenizer: str
    vocab_size: int | list[int]
    parameters: int | None
    step: int | None = Field(description="training step of the best checkpoint")
    tokens_seen: int | None = Field(description="training tokens up to the best checkpoint (language models)")
    best_val_loss: float | None = Field(description="validation loss (nats per token) of the best checkpoint")
    fine_tuned: bool


class Generated(BaseModel):
    text: str
    finish_reason: str = Field(description="stop (a stop string or the end) or length (max_tokens reached)")


class Alternative(BaseModel):
    token: str
    id: int
    logprob: float


class TokenLogprob(BaseModel):
    token: str
    id: int
    logprob: float
    rank: int = Field(description="1 = the model's most likely token")
    top: list[Alternative]


class ScoreResult(BaseModel):
    loss: float = Field(description="mean negative log-likelihood, nats per scored token")
    perplexity: float
    bits_per_char: float
    total_logprob: float
    tokens: int = Field(description="scored tokens (the first token of a language model's text is context)")
    characters: int
    per_token: list[TokenLogprob] | None = None


class PassageHit(BaseModel):
    text: str
    source: str = Field(description="file:first-last line of the indexed document")
    score: float = Field(description="BM25 score")


class Translation(BaseModel):
    text: str
    score: float = Field(description="log P(translation | text) / length^length_penalty")


def _tool_error(message: str) -> Exception:
    from mcp.server.mcpserver.exceptions import ToolError

    return ToolError(message)


class RunTools:
    """The read-only tools over the runs of a registry; `all()` lists them for MCPServer.add_tool."""

    def __init__(self, registry: RunRegistry) -> None:
        self.registry = registry

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.list_runs,
            self.describe_run,
            self.generate,
            self.score,
            self.next_tokens,
            self.translate,
        ]

    async def _on_run(self, name: str, work: Callable[[Any, Any], T]) -> T:
        """`work(run, budget)` under the run's lock in a worker thread."""
        try:
            return await self.registry.call(name, work, self.registry.budget())
        except APIError as err:
            raise _tool_error(err.message) from None

    async def _metadata(self, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(fn)
        except APIError as err:
            raise _tool_error(err.message) from None

    def _check_length(self, text: str, what: str) -> None:
        limit = self.registry.limits.max_prompt_chars
        if len(text) > limit:
            raise _tool_error(f"{what}: {len(text)} characters; this server takes {limit}")

    async def list_runs(self) -> list[RunSummary]:
        """The trained runs this server serves: family, tokenizer, parameters, tokens seen, best val loss."""
        from lmzoo.serve.probe import run_summary

        registry = self.registry
        return await self._metadata(
            lambda: [RunSummary(**run_summary(registry.open(n))) for n in registry.names()]
        )

    async def describe_run(self, run: RunName) -> dict[str, Any]:
        """One run in full: its summary, resolved config, best checkpoint info, last metrics record."""
        from lmzoo.serve.probe import run_summary

        def describe() -> dict[str, Any]:
            loaded = self.registry.open(run)
            records = loaded.metrics()
            return {
                **run_summary(loaded),
                "config": loaded.config.model_dump(mode="json"),
                "best": loaded.info("best"),
                "last_metrics": records[-1] if records else None,
            }

        return await self._metadata(describe)

    async def generate(
        self,
        run: RunName,
        prompt: Annotated[str, Field(description="Text to continue (seq2seq runs: to translate)")],
        max_tokens: Annotated[int, Field(ge=1)] = 100,
        temperature: Annotated[float | None, Field(ge=0, le=2, description="0 = greedy")] = None,
        top_k: Annotated[int | None, Field(ge=1)] = None,
        top_p: Annotated[float | None, Field(gt=0, le=1)] = None,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> Generated:
        """Sample a continuation of the prompt (or a translation, for seq2seq runs)."""
        from lmzoo.serve.completions import Choices, completion_plan
        from lmzoo.serve.schema import CompletionRequest, check_limits, validation_error

        fields = dict(model=run, prompt=prompt, max_tokens=max_tokens, temperature=temperature)
        fields.update(top_k=top_k, top_p=top_p, seed=seed, stop=stop)
        try:
            request = CompletionRequest.model_validate(fields)
            check_limits(request, self.registry.limits)
            choices = Choices(
                self.registry, self.registry.budget(), run, lambda r: completion_plan(r, request)
            )
            done = await choices.run()
        except ValidationError as err:
            raise _tool_error(validation_error(err).message) from None
        except APIError as err:
            raise _tool_error(err.message) from None
        return Generated(text=done.choices[0].text, finish_reason=done.choices[0].finish_reason)

    async def score(
        self,
        run: RunName,
        text: Annotated[str, Field(min_length=1, description="The text to score (seq2seq: the target)")],
        source: Source = None,
        per_token: Annotated[
            bool, Field(description="Also return each token's logprob, rank, top-k")
        ] = False,
        top_k: Annotated[int, Field(ge=1, le=20)] = 5,
    ) -> ScoreResult:
        """How likely the model finds a text: loss, perplexity, bits per character, optional per-token detail."""
        self._check_length(text + (source or ""), "text")
        device = self.registry.device

        def work(loaded: Any, budget: Any) -> ScoreResult:
            return _score_result(loaded.score(text, source=source, device=device, top_k=top_k), per_token)

        return await self._on_run(run, work)

    async def next_tokens(
        self,
        run: RunName,
        prefix: Annotated[str, Field(description="The text so far (seq2seq: the target so far)")],
        k: Annotated[int, Field(ge=1, le=50)] = 10,
        source: Source = None,
    ) -> list[Alternative]:
        """The model's k most likely next tokens after the prefix, with their log-probabilities."""
        from lmzoo.serve.probe import next_tokens

        self._check_length(prefix + (source or ""), "prefix")
        device = self.registry.device

        def work(loaded: Any, budget: Any) -> list[Alternative]:
            found = next_tokens(loaded, prefix, k, device=device, source=source)
            return [Alternative(token=t, id=i, logprob=lp) for t, i, lp in found]

        return await self._on_run(run, work)

    async def translate(
        self,
        run: RunName,
        text: Annotated[str, Field(min_length=1)],
        beam: Annotated[int, Field(ge=1, le=16)] = 5,
        n_best: Annotated[int, Field(ge=1, le=16)] = 1,
    ) -> list[Translation]:
        """seq2seq runs: the n_best beam-search translations of the text, with their scores."""
        self._check_length(text, "text")
        device = self.registry.device

        def work(loaded: Any, budget: Any) -> list[Translation]:
            found = loaded.translate(text, beam=beam, n_best=n_best, device=device)
            return [Translation(text=t, score=s) for t, s in found]

        return await self._on_run(run, work)


class PassageTool:
    """`retrieve` over the BM25 passage index the server was started with (loaded on first use)."""

    def __init__(self, index_dir: Path) -> None:
        self.index_dir, self._lock = index_dir, threading.Lock()
        self._index: Bm25Index | None = None

    def _search(self, query: str, k: int) -> list[PassageHit]:
        from lmzoo.retrieval.bm25 import Bm25Index

        with self._lock:
            if self._index is None:
                self._index = Bm25Index.load(self.index_dir)
            found = self._index.search(query, min(k, len(self._index)))
        return [PassageHit(text=p.text, source=p.source, score=p.score) for p in found]

    async def retrieve(
        self,
        query: Annotated[str, Field(min_length=1, max_length=2000)],
        k: Annotated[int, Field(ge=1, le=20)] = 4,
    ) -> list[PassageHit]:
        """The k passages of the server's document index (BM25) that best match the query, best first."""
        from lmzoo.errors import LmzooError

        try:
            return await asyncio.to_thread(self._search, query, k)
        except LmzooError as err:
            raise _tool_error(str(err)) from None


def _score_result(scored: Any, per_token: bool) -> ScoreResult:
    tokens = None
    if per_token:
        tokens = [
            TokenLogprob(
                token=t.text,
                id=t.id,
                logprob=t.logprob,
                rank=t.rank,
                top=[Alternative(token=a, id=i, logprob=lp) for a, i, lp in t.top],
            )
            for t in scored.tokens
        ]
    return ScoreResult(
        loss=scored.loss,
        perplexity=scored.ppl,
        bits_per_char=scored.bits_per_char,
        total_logprob=scored.total_logprob,
        tokens=len(scored.tokens),
        characters=scored.characters,
        per_token=tokens,
    )
