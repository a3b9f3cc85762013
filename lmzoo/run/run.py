"""`Run`: the one owner of a run directory, and the library verbs every command calls.

    >>> from lmzoo import Run
    >>> run = Run.open("lstm")                      # a path, a name under ./runs, or None: the newest
    >>> print("".join(run.generate("ROMEO:", max_new_tokens=50)))
    >>> run.evaluate()["loss"], run.score("To be, or not to be").bits_per_char

What the directory holds and how its models load is `lmzoo.run.directory.RunDirectory`; `Run` adds one
thin method per verb: sampling, decoding and translating, evaluating, scoring.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError

from lmzoo.config.errors import describe
from lmzoo.config.schema import SampleConfig
from lmzoo.device import pick_device, pick_precision
from lmzoo.errors import CheckpointError, ConfigError, DataError
from lmzoo.inference.decoding import Decoding, decode
from lmzoo.inference.instructions import InstructionScores
from lmzoo.inference.sampling import SamplingOptions
from lmzoo.inference.scoring import Scored
from lmzoo.run.directory import RunDirectory

if TYPE_CHECKING:
    from lmzoo.data.prepare import PreparedCorpus
    from lmzoo.inference.chat import ChatTemplate
    from lmzoo.inference.engine import Engine


class Run(RunDirectory):
    """A run directory and what can be asked of it (lmzoo.run.directory.RunDirectory holds the files)."""

    @property
    def base(self) -> Run | None:
        """The init_from run this run was fine-tuned from (None for a run trained from scratch)."""
        base_dir = self.base_dir
        return None if base_dir is None else Run.open(base_dir)

    # ---- the library verbs ----

    def sampling(self, **overrides: Any) -> SamplingOptions:
        """Sampling options: the run's `sample:` section with the given (non-None) values on top, validated."""
        given = {key: value for key, value in overrides.items() if value is not None}
        try:
            merged = SampleConfig.model_validate({**self.config.sample.model_dump(), **given})
        except ValidationError as err:
            raise ConfigError(describe(err, SampleConfig, ())) from None
        fields = merged.model_dump(exclude={"prompt"})
        return SamplingOptions(**{**fields, "stop": tuple(fields["stop"])})

    def engine(self, checkpoint_tag: str = "best", device: str = "auto", *, slots: int = 32) -> Engine:
        """A batched decoding engine on this run's model: `engine.generate(prompts, options)` decodes many
        prompts together (lmzoo.inference.engine); options from `sampling(...)`."""
        from lmzoo.inference.engine import Engine

        return Engine(self.load(checkpoint_tag, device), slots)

    def chat_template(self) -> ChatTemplate:
        """How a conversation becomes this run's prompt: an instruction-tuned run's own data.template, the
        template of the run a preference-tuned (DPO) run started from, else the default dialogue one."""
        from lmzoo.inference.chat import DIALOGUE, ChatTemplate

        if self.kind == "seq2seq":
            raise ConfigError(
                f"{self.name} is a seq2seq run: it translates and has no chat template; "
                "send its text to /v1/completions (lmzoo generate) instead"
            )
        if self.config.data.format == "instruct":
            return ChatTemplate.instruct(self.config.data.template)
        if self.config.data.format == "preference":
            try:
                base = self.base
            except CheckpointError:
                base = None
            if base is not None:
                return base.chat_template()
        return DIALOGUE

    def decode(
        self,
        prompt: str | Sequence[int],
        *,
        checkpoint_tag: str = "best",
        device: str = "auto",
        seed: int | None = None,
        top_logprobs: int | None = None,
        cache: str = "dynamic",
        warn: Callable[[str], None] | None = None,
        **sampling: Any,
    ) -> Decoding:
        """Continue `prompt` (text or token ids; seq2seq runs: translate it), one step per token: its
        text, id and, with `top_logprobs`, its probabilities; `finish_reason` once consumed. `sampling`
        holds the options of the run's `sample:` section (max_new_tokens, temperature, top_k, stop...)."""
        options = self.sampling(**sampling)
        lm = self.load(checkpoint_tag, device)
        return decode(lm, prompt, options, seed=seed, top_logprobs=top_logprobs, warn=warn, cache=cache)

    def generate(
        self,
        prompt: str,
        *,
        checkpoint_tag: str = "best",
        device: str = "auto",
        seed: int | None = None,
        cache: str = "dynamic",
        warn: Callable[[str], None] | None = None,
        **sampling: Any,
    ) -> Iterator[str]:
        """Stream the continuation of `prompt` (language models) or its translation (seq2seq), as text pieces."""
        steps = self.decode(
            prompt,
            checkpoint_tag=checkpoint_tag,
            device=device,
            seed=seed,
            cache=cache,
            warn=warn,
            **sampling,
        )
        return (step.text for step in steps if step.text)

    def translate(
        self,
        text: str,
        *,
        beam: int = 5,
        n_best: int = 1,
        length_penalty: float = 1.0,
        max_new_tokens: int | None = None,
        checkpoint_tag: str = "best",
        device: str = "auto",
        warn: Callable[[str], None] | None = None,
    ) -> list[tuple[str, float]]:
        """seq2seq runs: the `n_best` beam-search translations of `text` with their scores."""
        from lmzoo.inference.seq2seq import translate

        if self.kind != "seq2seq":
            raise ConfigError(f"{self.path} is a language model; translate needs a seq2seq run")
        if beam < 1:
            raise ConfigError(f"beam must be >= 1, got {beam}", param="beam")
        if not 1 <= n_best <= beam:
            raise ConfigError(f"n_best must be between 1 and the beam ({beam}), got {n_best}", param="n_best")
        lm = self.load(checkpoint_tag, device)
        limit = min(lm.max_target_len, max_new_tokens or lm.max_target_len)
        return translate(
            lm.seq2seq_model, lm.tokenizer, lm.output_tokenizer, text, max_len=limit, beam=beam,
            length_penalty=length_penalty, n_best=n_best, warn=warn,
        )  # fmt: skip

    def prepared(self, data: str | Path | list[str | Path] | None = None) -> PreparedCorpus:
        """A text (a file, folder or glob, read whole into the split "train") or else the run's corpus,
        tokenized by the run's tokenizer into memory-mapped token files: from the cache when it is there."""
        from lmzoo.data.prepare import prepare_corpus, prepare_text

        if data is not None:
            return prepare_text(data, self.tokenizer, cache_dir=self.config.data.cache_dir)
        return prepare_corpus(self.config.data, self.tokenizer)

    def evaluation_tokens(self, data: str | Path | None = None, split: str = "val") -> torch.Tensor:
        """The token ids `evaluate` reads (language models): a text file, folder or glob, or the run's
        val/test split, as a tensor over the prepared token file (read lazily, window by window)."""
        if split not in ("val", "test"):
            raise ConfigError(f"split must be val or test, got {split!r}", param="split")
        ids = self.prepared(data).tensor("train" if data is not None else split)
        if not len(ids):
            raise DataError(f"the run's {split} split is empty; pass data=FILE", param="data")
        return ids

    def evaluate(
        self,
        data: str | Path | None = None,
        split: str = "val",
        *,
        beam: int = 5,
        checkpoint_tag: str = "best",
        device: str = "auto",
    ) -> dict[str, float]:
        """Loss and perplexity on a text file or the run's val/test split; seq2seq runs add greedy and beam
        BLEU. Language models read the text as `score` does: every token after the first."""
        from lmzoo.inference.evaluate import evaluate_pairs
        from lmzoo.inference.scoring import evaluate_stream

        if self.kind != "seq2seq":
            return evaluate_stream(self.load(checkpoint_tag, device), self.evaluation_tokens(data, split))
        from lmzoo.data.example_files import ExampleSplits, read_pair_file

        if split not in ("val", "test"):
            raise ConfigError(f"split must be val or test, got {split!r}", param="split")
        cfg = self.config.data
        pairs = read_pair_file(cfg, str(data)) if data is not None else list(ExampleSplits(cfg).stream(split))
        if not pairs:
            raise DataError(f"the run's {split} split has no sentence pairs; pass data=FILE", param="data")
        return evaluate_pairs(self.load(checkpoint_tag, device), pairs, beam=beam)

    def evaluate_instructions(
        self,
        path: str | Path,
        *,
        max_new_tokens: int = 32,
        reference: str | Path | None = None,
        checkpoint_tag: str = "best",
        device: str = "auto",
    ) -> InstructionScores:
        """Greedy exact match and style rate on instruct records (JSON/JSONL {instruction, input, output},
        optionally `task`), prompts rendered with the run's data.template; with `reference` (a run with
        the same tokenizer), also the KL divergence from it per response."""
        from lmzoo.data.example_files import read_records
        from lmzoo.inference.instructions import INSTRUCTION_FIELDS, evaluate_instructions

        if self.kind == "seq2seq":
            raise ConfigError(f"{self.path} is a seq2seq model; instructions are answered by language models")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}", param="max_new_tokens")
        records = read_records(str(path), INSTRUCTION_FIELDS, ("task",))
        reference_lm = None
        if reference is not None:
            other = Run.open(reference)
            if other.kind != "lm" or other.tokenizer.to_dict() != self.tokenizer.to_dict():
                raise ConfigError(
                    f"{other.path} cannot be the reference: it is not a language model with this run's "
                    "tokenizer",
                    param="reference",
                )
            reference_lm = other.load(checkpoint_tag, device)
        return evaluate_instructions(
            self.load(checkpoint_tag, device),
            records,
            self.config.data.template,
            max_new_tokens=max_new_tokens,
            reference=reference_lm,
            where=str(path),
        )

    def evaluate_preferences(
        self, path: str | Path, *, checkpoint_tag: str = "best", device: str = "auto"
    ) -> dict[str, float]:
        """A reward model run on preference pairs (JSONL {prompt, chosen, rejected}, optionally `kind`): the
        Bradley-Terry loss, pair accuracy (ties count half), margins, and the accuracy of each kind and,
        with a `task` field, of each task and kind."""
        from lmzoo.data.example_files import read_records
        from lmzoo.inference.preferences import PAIR_FIELDS, encode_pairs, pair_metrics, pair_rewards

        records = read_records(str(path), PAIR_FIELDS, ("kind", "task"), nonempty=("chosen", "rejected"))
        where = pick_device(device)
        model = self.reward_model(checkpoint_tag, where)
        pairs = encode_pairs(self.tokenizer, records, self.config.model.context_len, str(path))
        precision = pick_precision(where, self.config.train.precision)
        chosen, rejected = pair_rewards(
            model, pairs, batch_size=self.config.data.eval_rows, precision=precision
        )
        kinds, tasks = [r["kind"] for r in records], [r["task"] for r in records]
        return {**pair_metrics(chosen, rejected, kinds, tasks), "pairs": len(pairs)}

    def score(
        self,
        text: str,
        *,
        source: str | None = None,
        checkpoint_tag: str = "best",
        device: str = "auto",
        top_k: int = 5,
    ) -> Scored:
        """Per-token log-probabilities of `text` (for seq2seq runs: of the target given `source`)."""
        from lmzoo.inference.scoring import score_target, score_text

        if self.kind == "seq2seq" and source is None:
            raise ConfigError("a seq2seq run scores a target given its source: pass source=", param="source")
        if self.kind != "seq2seq" and source is not None:
            raise ConfigError(
                "source is for seq2seq runs; a language model scores the text alone", param="source"
            )
        lm = self.load(checkpoint_tag, device)
        if source is not None:
            return score_target(lm, source, text, top_k=top_k)
        return score_text(lm, text, top_k=top_k)

    def score_file(
        self, path: str | Path, *, checkpoint_tag: str = "best", device: str = "auto", top_k: int = 5
    ) -> Scored:
        """`score` of a text file (language models), read from its prepared token file: equals
        `evaluate(data=path)` and `score` of the file's text."""
        from lmzoo.inference.scoring import score_ids

        if self.kind == "seq2seq":
            raise ConfigError("a seq2seq run scores a target given its source: pass source= and the text")
        prepared = self.prepared(path)
        lm = self.load(checkpoint_tag, device)
        return score_ids(
            lm, prepared.tensor("train"), characters=prepared.characters("train") or 0, top_k=top_k
        )
