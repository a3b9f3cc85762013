"""`lmzoo` as an lm-evaluation-harness model: lm-eval's three request types on the inference core.

    lmzoo lm-eval run --model lmzoo --model_args run=runs/gpt --tasks lmzoo_shakespeare

- loglikelihood: each context + continuation read by the one scorer
  (lmzoo.inference.scoring.score_sequences), the continuation's logprobs summed; "greedy" when every
  continuation token is the model's most likely one (rank 1).
- loglikelihood_rolling: a whole text read after the start token (`prefix_token_id`: a line break,
  as the text a language model starts from; lmzoo's models train on running text with no start
  token), every token of it scored: `lmzoo score` of the line break and the text gives the same
  numbers, token for token.
- generate_until: the contexts decoded together by the batched engine (lmzoo.inference.engine), each
  cut at the first of its `until` strings or at <eos>, greedy unless `do_sample`.

The same numbers come through `lmzoo serve` with lm-eval's `local-completions` model (docs/serving.md).
"""

from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models; it registers them only into an empty registry)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from lmzoo.errors import ConfigError
from lmzoo.inference.engine import Engine
from lmzoo.inference.sampling import SamplingOptions
from lmzoo.inference.scoring import score_sequences
from lmzoo.inference.text import start_ids
from lmzoo.run import Run

CHUNK = 256  # requests scored per call to the scorer (its batches are the run's data.eval_rows)


@register_model("lmzoo")
class LmzooLM(TemplateLM):
    """A trained lmzoo language model. model_args: `run` (a run directory, or a name under `runs_dir`),
    `checkpoint` (best or last), `device`, `slots` (sequences generated together), `seed` (sampling)."""

    def __init__(
        self,
        run: str,
        checkpoint: str = "best",
        device: str | None = None,
        runs_dir: str = "runs",
        slots: int = 32,
        seed: int = 1234,
        batch_size: Any = None,  # lm-eval's; the run's data.eval_rows and `slots` decide instead
        max_batch_size: Any = None,
        **_: Any,
    ) -> None:
        super().__init__()
        self.run = Run.open(run, runs_dir=runs_dir)
        if self.run.kind == "seq2seq":
            raise ConfigError(f"{self.run.path} is a seq2seq run; lm-eval's tasks score language models")
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            device = None  # lm-eval's default device is cuda:0; like its hf model, use what there is
        self.lm = self.run.load(checkpoint, device or "auto")
        self.engine = Engine(self.lm, int(slots))
        self.seed = int(seed)
        self.vocab = self.lm.tokenizer

    # ---- what lm-eval asks of a tokenizer ----

    @property
    def eot_token_id(self) -> int:
        return self.vocab.eos_id

    @property
    def prefix_token_id(self) -> int:
        return start_ids(self.vocab)[0]

    @property
    def max_length(self) -> int:
        return self.run.config.model.context_len or self.lm.window

    @property
    def tokenizer_name(self) -> str:
        return f"lmzoo-{self.vocab.kind}-{self.vocab.vocab_size}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.vocab.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.vocab.decode(tokens)

    # ---- the three request types ----

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(sum of the continuation's logprobs, whether each continuation token ranks first) per request."""
        results: list[tuple[float, bool]] = []
        for first in tqdm(range(0, len(requests), CHUNK), disable=disable_tqdm, desc="lmzoo loglikelihood"):
            chunk = requests[first : first + CHUNK]
            scored = score_sequences(self.lm, [context + continuation for _, context, continuation in chunk])
            for (key, _, continuation), scores in zip(chunk, scored, strict=True):
                count = len(continuation)
                answer = (float(scores.logprobs[-count:].sum()), bool((scores.ranks[-count:] == 1).all()))
                results.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        texts = [request.args[0] for request in requests]
        answers = [
            total
            for total, _ in self._loglikelihood_tokens(
                [(None, [self.prefix_token_id], self.tok_encode(text)) for text in texts], disable_tqdm
            )
        ]
        for text, answer in zip(texts, answers, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), answer)
        return answers

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        prompts, options = [], []
        for request in requests:
            context, settings = request.args
            prompts.append(self.tok_encode(context) or start_ids(self.vocab))
            options.append(generation_options(dict(settings)))
        seeds = [self.seed + index for index in range(len(prompts))]
        done = self.engine.generate(prompts, options, seeds=seeds)
        for request, generation in zip(requests, done, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, generation.text)
        return [generation.text for generation in done]


def generation_options(settings: dict[str, Any]) -> SamplingOptions:
    """lm-eval's generation_kwargs as sampling options: `until` strings stop the text; greedy unless
    `do_sample` (and a temperature above 0)."""
    until = settings.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(settings.pop("temperature", 0.0) or 0.0)
    sample = bool(settings.pop("do_sample", False)) and temperature > 0
    return SamplingOptions(
        max_new_tokens=int(settings.pop("max_gen_toks", settings.pop("max_new_tokens", 256))),
        temperature=temperature if sample else 1.0,
        greedy=not sample,
        top_p=settings.get("top_p") if sample else None,
        top_k=settings.get("top_k") if sample else None,
        stop=tuple(s for s in until if s),
    )
