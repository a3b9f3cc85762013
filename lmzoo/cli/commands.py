"""The core verbs: train, generate, eval, merge, models. Each parses, calls the library, prints."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from lmzoo.cli.app import BASE_HELP, DEVICE_HELP, RUN_HELP, app, prompts, user_errors, warn

if TYPE_CHECKING:
    from lmzoo.run import Run


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML run config, e.g. configs/lstm.yaml.", show_default=False),
    overrides: list[str] | None = typer.Argument(
        None,
        help="Overrides as section.key=value, e.g. train.lr=3e-4 model.hidden_size=256.",
        show_default=False,
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the newest run of this config from its last checkpoint (or start it).",
    ),
    device: str | None = typer.Option(
        None, help="Force a device: cpu, cuda, cuda:N or mps (default: train.device)."
    ),
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Show the progress bar (default: when stderr is a terminal)."
    ),
) -> None:
    """Train a model as the config describes; writes runs/<name>/ (config, tokenizer, checkpoints, logs)."""
    with user_errors():
        import lmzoo.interop  # noqa: F401  (init_from: hf:DIR)
        from lmzoo.run import load_config
        from lmzoo.training.loop import train as run_training

        items = list(overrides or []) + ([f"train.device={device}"] if device else [])
        hint = " ".join(["lmzoo train", str(config), *(overrides or []), "--resume"])
        show = sys.stderr.isatty() if progress is None else progress
        resolved = load_config(config, items)
        run_dir = run_training(resolved, resume=resume, progress=show, resume_hint=hint)
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
            if resolved.train.objective == "reward":
                next_step = f"score pairs with: lmzoo eval --run {run_dir} --pairs FILE"
            else:
                next_step = f"sample it with: lmzoo generate --run {run_dir}"
            typer.echo(f"done: {run_dir}  ({next_step})", err=True)


@app.command()
def generate(
    run: str | None = typer.Option(None, "--run", "-r", help=RUN_HELP),
    seed: str | None = typer.Option(
        None, "--seed", "--prompt", "-s", help="Text to continue; without it, an interactive prompt opens."
    ),
    max_new_tokens: int | None = typer.Option(
        None, help="Tokens to generate (default: the run's sample.max_new_tokens)."
    ),
    temperature: float | None = typer.Option(None, help="Sampling temperature; 0 = greedy."),
    top_k: int | None = typer.Option(None, help="Sample only among the k most likely tokens."),
    top_p: float | None = typer.Option(
        None, help="Nucleus sampling: smallest set of tokens with this much probability."
    ),
    greedy: bool = typer.Option(False, "--greedy", help="Always take the most likely token."),
    repetition_penalty: float | None = typer.Option(None, help="> 1 discourages tokens already in the text."),
    num_samples: int = typer.Option(
        1, min=1, help="How many continuations to write (decoded together; sample i seeded --seed-rng + i)."
    ),
    seed_rng: int | None = typer.Option(
        None, "--seed-rng", help="Random seed for sampling (reproducible output)."
    ),
    chat: bool = typer.Option(
        False,
        "--chat",
        help="Chat with the run on its chat template (--seed: one message, else interactive).",
    ),
    system: str | None = typer.Option(None, help="--chat: a system message put before the conversation."),
    stop: list[str] | None = typer.Option(None, help="Stop when this text appears (repeatable)."),
    beam: int = typer.Option(
        1, min=1, help="Seq2seq: beam search with this many beams (1 = greedy/sampling, streamed)."
    ),
    n_best: int = typer.Option(
        1, min=1, help="Seq2seq with --beam: print this many best translations with their scores."
    ),
    length_penalty: float = typer.Option(1.0, help="Seq2seq beam search: score = logprob / length^penalty."),
    checkpoint: str = typer.Option("best", help="Which checkpoint: best or last."),
    base: Path | None = typer.Option(None, help=BASE_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    cache: str = typer.Option(
        "dynamic",
        help="Decoder KV cache: dynamic, static (fixed shapes) or compiled (static, torch.compile'd step; "
        "CUDA graphs on CUDA). gpt and modern runs; the same tokens.",
    ),
    knn: Path | None = typer.Option(None, help="Mix in a kNN-LM datastore (lmzoo index)."),
    k: int = typer.Option(1024, help="--knn: neighbours per token."),
    lmbda: float = typer.Option(0.25, help="--knn: weight of the kNN distribution."),
    knn_temperature: float = typer.Option(1.0, help="--knn: p_kNN ~ exp(-distance / this)."),
    rag: Path | None = typer.Option(None, help="Put BM25 passages (lmzoo rag index) before the prompt."),
    passages: int = typer.Option(2, min=1, help="--rag: passages to retrieve (those that fit are used)."),
    show_probs: bool = typer.Option(
        False, "--show-probs", help="Shade tokens by probability; list alternatives and entropy per step."
    ),
    top_logprobs: int = typer.Option(5, min=0, help="--show-probs: alternatives listed per step."),
    as_json: bool = typer.Option(False, "--json", help="--show-probs: OpenAI-shaped logprobs records."),
) -> None:
    """Continue a text with a language model, or translate it with a seq2seq model, streaming the output."""
    with user_errors():
        from lmzoo.run import Run

        loaded = Run.open(run, base=base)
        if knn is not None:
            from lmzoo.retrieval.interpolate import with_knn

            loaded = with_knn(loaded, knn, k=k, lmbda=lmbda, temperature=knn_temperature)
        sampling = dict(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            greedy=greedy or None,
            stop=stop or None,
        )
        loaded.sampling(**sampling)  # a bad option fails before the model loads
        if chat:
            from lmzoo.cli.chat import chat_in_terminal

            chat_in_terminal(
                loaded, seed, system, sampling, seed=seed_rng, checkpoint=checkpoint, device=device
            )
            return
        options = (seed_rng, beam, n_best, length_penalty, checkpoint, device, cache, rag, passages)
        request = GenerateRequest(sampling, num_samples, *options, show_probs, top_logprobs, as_json)
        verb = "translating with" if loaded.kind == "seq2seq" else "sampling from"
        for prompt in prompts(seed, f"{verb} {loaded.path}"):
            _write_generation(loaded, prompt, request)


@dataclass
class GenerateRequest:
    """What `lmzoo generate` was asked for, beyond the run and the prompt."""

    sampling: dict[str, Any]
    num_samples: int
    seed: int | None
    beam: int
    n_best: int
    length_penalty: float
    checkpoint: str
    device: str
    cache: str
    rag: Path | None
    passages: int
    show_probs: bool
    top_logprobs: int
    as_json: bool


def _write_generation(loaded: Run, prompt: str, request: GenerateRequest) -> None:
    """One prompt's output: beam translations, a probability view, or streamed samples (+ RAG sources)."""
    where = {"checkpoint_tag": request.checkpoint, "device": request.device}
    if request.beam > 1 and loaded.kind == "seq2seq" and not request.show_probs:
        for text, score in loaded.translate(
            prompt,
            beam=request.beam,
            n_best=request.n_best,
            warn=warn,
            length_penalty=request.length_penalty,
            max_new_tokens=request.sampling["max_new_tokens"],
            **where,
        ):
            typer.echo(f"{text}\t{score:.4f}" if request.n_best > 1 else text)
        return
    text, sources = prompt, list[Any]()
    if request.rag is not None:
        from lmzoo.retrieval.rag import rag_prompt

        max_new = loaded.sampling(**request.sampling).max_new_tokens
        text, sources = rag_prompt(
            loaded, prompt, request.rag, passages=request.passages, max_new_tokens=max_new, warn=warn
        )
    if request.show_probs:
        from lmzoo.cli.inspect import print_generation_probs

        print_generation_probs(
            loaded,
            text,
            samples=request.num_samples,
            top_logprobs=request.top_logprobs,
            as_json=request.as_json,
            beam=request.beam,
            sampling=request.sampling,
            seed=request.seed,
            cache=request.cache,
            warn=warn,
            **where,
        )
    elif request.num_samples > 1:  # decoded together, in the batched engine
        engine = loaded.engine(request.checkpoint, request.device, slots=min(request.num_samples, 32))
        seeds = [None if request.seed is None else request.seed + i for i in range(request.num_samples)]
        done = engine.generate([text] * request.num_samples, loaded.sampling(**request.sampling), seeds=seeds)
        for line in done[0].warnings:
            warn(line)
        head = "" if loaded.kind == "seq2seq" else prompt
        typer.echo("\n---\n".join(head + generation.text for generation in done))
    else:
        typer.echo("" if loaded.kind == "seq2seq" else prompt, nl=False)
        for piece in loaded.generate(
            text, seed=request.seed, cache=request.cache, warn=warn, **where, **request.sampling
        ):
            typer.echo(piece, nl=False)
        typer.echo()
    if sources:  # after the text; on stderr when stdout carries JSON
        (warn if request.as_json else typer.echo)("sources: " + ", ".join(p.source for p in sources))


@app.command("eval")
def evaluate(
    run: str | None = typer.Option(None, "--run", "-r", help=RUN_HELP),
    data: Path | None = typer.Option(None, help="A text file to score (default: the run's split)."),
    split: str = typer.Option(
        "val", help="Which split of the run's corpus when --data is not given: val or test."
    ),
    checkpoint: str = typer.Option("best", help="Which checkpoint: best or last."),
    beam: int = typer.Option(
        5, min=1, help="Seq2seq: beam size for the beam-search BLEU (greedy BLEU is reported too)."
    ),
    base: Path | None = typer.Option(None, help=BASE_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    knn: Path | None = typer.Option(None, help="Also the loss mixed with a kNN-LM datastore (lmzoo index)."),
    k: int = typer.Option(1024, help="--knn: neighbours per token."),
    lmbda: float = typer.Option(0.25, help="--knn: weight of the kNN distribution."),
    temperature: float = typer.Option(
        1.0, "--temperature", "--knn-temperature", help="--knn: T in exp(-d / T)."
    ),
    tune: bool = typer.Option(
        False, "--tune", help="--knn: pick lambda and T on half the text, report the other."
    ),
    rag: Path | None = typer.Option(
        None, help="Loss with BM25 passages vs random and none (lmzoo rag index)."
    ),
    passages: int = typer.Option(1, min=1, help="--rag: passages per chunk."),
    instructions: Path | None = typer.Option(
        None,
        help="Instruct records (JSONL: instruction, input, output, optional task): greedy exact match per "
        "task and overall, and the style rate (answers ending with a full stop).",
    ),
    max_new_tokens: int = typer.Option(32, min=1, help="--instructions: longest answer, in tokens."),
    reference: Path | None = typer.Option(
        None, help="--instructions: also the KL divergence from this run (e.g. the SFT run), per answer."
    ),
    pairs: Path | None = typer.Option(
        None, help="Reward model runs: preference pairs (JSONL: prompt, chosen, rejected) to score."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="--instructions, --pairs: the scores as one JSON object."
    ),
) -> None:
    """Print loss and perplexity on held-out text; for seq2seq runs also corpus BLEU, greedy and beam;
    with --instructions, exact match on instructions."""
    with user_errors():
        from lmzoo.cli.retrieval import evaluate_with_retrieval
        from lmzoo.run import Run

        loaded = Run.open(run, base=base)
        if pairs is not None or instructions is not None:
            _evaluate_answers(
                loaded, pairs, instructions, checkpoint, device, max_new_tokens, reference, as_json=as_json
            )
            return
        if knn is not None or rag is not None:
            lines = evaluate_with_retrieval(
                loaded, knn, rag, data, split, checkpoint, device,
                k=k, lmbda=lmbda, temperature=temperature, tune=tune, passages=passages,
            )  # fmt: skip
            for line in lines:
                typer.echo(line)
            return
        metrics = loaded.evaluate(data, split, beam=beam, checkpoint_tag=checkpoint, device=device)
        source = str(data) if data else f"the {split} split"
        bleu = "".join(
            f"  BLEU {key[5:]} {value:.2f}" for key, value in metrics.items() if key.startswith("bleu_")
        )
        typer.echo(
            f"{loaded.path} ({checkpoint}) on {source}: loss {metrics['loss']:.4f}  ppl {metrics['ppl']:.2f}"
            f"{bleu}  ({int(metrics['tokens']):,} tokens)"
        )


def _evaluate_answers(
    run: Run,
    pairs: Path | None,
    instructions: Path | None,
    checkpoint: str,
    device: str,
    max_new_tokens: int,
    reference: Path | None,
    *,
    as_json: bool,
) -> None:
    """`lmzoo eval --pairs` (a reward model on preference pairs) or `--instructions` (exact match)."""
    if pairs is not None:
        metrics = run.evaluate_preferences(pairs, checkpoint_tag=checkpoint, device=device)
        _print_pair_scores(run, pairs, metrics, as_json)
        return
    assert instructions is not None
    scores = run.evaluate_instructions(
        instructions,
        max_new_tokens=max_new_tokens,
        reference=reference,
        checkpoint_tag=checkpoint,
        device=device,
    )
    _print_instruction_scores(run, instructions, checkpoint, scores, reference, as_json)


def _print_pair_scores(run: Run, path: Path, metrics: dict[str, float], as_json: bool) -> None:
    if as_json:
        import json

        typer.echo(json.dumps({"run": str(run.path), "file": str(path), **metrics}, indent=2))
        return
    groups = {
        key.split("/", 1)[1]: value for key, value in metrics.items() if key.startswith("reward_accuracy/")
    }
    kinds = "".join(f"  {group} {value:.1%}" for group, value in groups.items() if "/" not in group)
    typer.echo(
        f"{run.path} on {path}: pair accuracy {metrics['reward_accuracy']:.1%}{kinds}  margin "
        f"{metrics['reward_margin']:.3f}  loss {metrics['loss']:.4f}  ({int(metrics['pairs'])} pairs)"
    )
    by_task = "  ".join(f"{group} {value:.1%}" for group, value in groups.items() if "/" in group)
    if by_task:
        typer.echo(f"by task: {by_task}")


def _print_instruction_scores(
    run: Run, path: Path, checkpoint: str, scores: Any, reference: Path | None, as_json: bool
) -> None:
    """The table of `lmzoo eval --instructions` (or its JSON)."""
    if as_json:
        import json

        payload = {"run": str(run.path), "checkpoint": checkpoint, "file": str(path), **scores.as_dict()}
        typer.echo(json.dumps(payload, indent=2))
        return
    overall = scores.overall.as_dict()
    typer.echo(
        f"{run.path} ({checkpoint}) on {path}: exact match {overall['exact_match']:.1%}  style "
        f"{overall['style_rate']:.1%}  ({overall['count']} prompts, {scores.response_tokens:.1f} tokens per answer)"
    )
    width = max([len("task")] + [len(name) for name in scores.tasks])
    typer.echo(f"{'task':<{width}}  prompts  exact match   style")
    for name, score in sorted(scores.tasks.items()):
        row = score.as_dict()
        typer.echo(
            f"{name:<{width}}  {row['count']:>7}  {row['exact_match']:>11.1%}  {row['style_rate']:>6.1%}"
        )
    if scores.kl is not None:
        typer.echo(f"KL from {reference}: {scores.kl:.3f} nats per answer (answers sampled at temperature 1)")


@app.command()
def merge(
    run: str = typer.Option(
        ..., "--run", "-r", help="A LoRA fine-tune run directory (or name under ./runs)."
    ),
    out: Path | None = typer.Option(
        None, help="Where to write the merged run (default: <run>-merged beside it)."
    ),
    base: Path | None = typer.Option(None, help=BASE_HELP),
) -> None:
    """Fold a LoRA run's updates into its base weights: a plain run with the same outputs."""
    with user_errors():
        from lmzoo.run import Run
        from lmzoo.training.merge import merge_run

        merged = merge_run(Run.open(run, base=base), out)
        typer.echo(f"merged: {merged.path}  (sample it with: lmzoo generate --run {merged.path})")


@app.command()
def models() -> None:
    """List the registered model families with their parameter counts at default settings."""
    with user_errors():
        from lmzoo.models import list_models
        from lmzoo.models.registry import REFERENCE_VOCAB

        rows = [(m.name, m.kind, f"{m.reference_params():,}", m.description) for m in list_models()]
        widths = [max(len(r[i]) for r in rows + [("name", "kind", "params", "")]) for i in range(3)]
        typer.echo(f"{'name':<{widths[0]}}  {'kind':<{widths[1]}}  {'params':>{widths[2]}}  description")
        for name, kind, params, description in rows:
            typer.echo(f"{name:<{widths[0]}}  {kind:<{widths[1]}}  {params:>{widths[2]}}  {description}")
        typer.echo(
            f"(params: default config at a {REFERENCE_VOCAB}-token vocabulary, char-level Tiny Shakespeare)"
        )
