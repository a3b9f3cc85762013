"""The `lmzoo` command line: a thin typer layer over the library.

Each command parses its arguments and calls one library function. torch and the models are
imported inside the commands, so `lmzoo --help` starts instantly. A problem the user can fix
ends as one `error: ...` line on stderr with exit code 2 (see lmzoo.errors), never a traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import typer

from lmzoo import __version__
from lmzoo.errors import LmzooError

app = typer.Typer(
    name="lmzoo",
    help="Train, sample and evaluate language models from YAML configs.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn lmzoo's user-facing errors (and Ctrl-C) into one line and an exit code."""
    try:
        yield
    except LmzooError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        raise typer.Exit(130) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lmzoo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Train, sample and evaluate language models from YAML configs."""


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML run config, e.g. configs/lstm.yaml.", show_default=False),
    overrides: list[str] | None = typer.Argument(
        None, help="Overrides as section.key=value, e.g. train.lr=3e-4 model.hidden_size=256.", show_default=False
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the newest run of this config from its last checkpoint."),
    device: str | None = typer.Option(None, help="Force a device: cpu, cuda, cuda:N or mps (default: train.device)."),
    progress: bool | None = typer.Option(None, "--progress/--no-progress", help="Show the progress bar (default: when stderr is a terminal)."),
) -> None:
    """Train a model as the config describes; writes runs/<name>/ (config, tokenizer, checkpoints, logs)."""
    with user_errors():
        from lmzoo.config import load_config
        from lmzoo.train import train as run_training

        items = list(overrides or []) + ([f"train.device={device}"] if device else [])
        cfg = load_config(config, items)
        hint = " ".join(["lmzoo train", str(config), *(overrides or []), "--resume"])
        show = sys.stderr.isatty() if progress is None else progress
        run_dir = run_training(cfg, resume=resume, progress=show, resume_hint=hint)
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
            typer.echo(f"done: {run_dir}  (sample it with: lmzoo generate --run {run_dir})", err=True)


@app.command()
def generate(
    run: str | None = typer.Option(None, "--run", "-r", help="Run directory or name under ./runs (default: the newest run)."),
    seed: str | None = typer.Option(None, "--seed", "-s", help="Text to continue; without it, an interactive prompt opens."),
    max_new_tokens: int | None = typer.Option(None, help="Tokens to generate (default: the run's sample.max_new_tokens)."),
    temperature: float | None = typer.Option(None, help="Sampling temperature; 0 = greedy."),
    top_k: int | None = typer.Option(None, help="Sample only among the k most likely tokens."),
    top_p: float | None = typer.Option(None, help="Nucleus sampling: smallest set of tokens with this much probability."),
    greedy: bool = typer.Option(False, "--greedy", help="Always take the most likely token."),
    repetition_penalty: float | None = typer.Option(None, help="> 1 discourages tokens already in the text."),
    num_samples: int = typer.Option(1, help="How many continuations to write."),
    seed_rng: int | None = typer.Option(None, "--seed-rng", help="Random seed for sampling (reproducible output)."),
    stop: list[str] | None = typer.Option(None, help="Stop when this text appears (repeatable)."),
    beam: int = typer.Option(1, help="Seq2seq: beam search with this many beams (1 = greedy/sampling, streamed)."),
    n_best: int = typer.Option(1, help="Seq2seq with --beam: print this many best translations with their scores."),
    length_penalty: float = typer.Option(1.0, help="Seq2seq beam search: score = logprob / length^penalty."),
    checkpoint: str = typer.Option("best", help="Which checkpoint: best or last."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
) -> None:
    """Continue a text with a language model, or translate it with a seq2seq model, streaming the output."""
    with user_errors():
        import torch

        from lmzoo.checkpoint import load_run, resolve_run
        from lmzoo.device import pick_device
        from lmzoo.errors import ConfigError
        from lmzoo.generate import SamplingOptions, encode_prompt
        from lmzoo.generate import generate as sample

        loaded = load_run(resolve_run(run), checkpoint, pick_device(device))
        defaults = loaded.config.sample
        options = SamplingOptions(
            max_new_tokens=defaults.max_new_tokens if max_new_tokens is None else max_new_tokens,
            temperature=defaults.temperature if temperature is None else temperature,
            top_k=defaults.top_k if top_k is None else top_k,
            top_p=defaults.top_p if top_p is None else top_p,
            repetition_penalty=defaults.repetition_penalty if repetition_penalty is None else repetition_penalty,
            greedy=greedy, stop=tuple(stop or ()),
        )
        problems = [
            (options.temperature < 0, "--temperature must be >= 0"),
            (options.top_k is not None and options.top_k < 1, "--top-k must be >= 1"),
            (options.top_p is not None and not 0 < options.top_p <= 1, "--top-p must be in (0, 1]"),
            (options.repetition_penalty <= 0, "--repetition-penalty must be > 0"),
            (options.max_new_tokens < 1 or num_samples < 1, "--max-new-tokens and --num-samples must be >= 1"),
            (beam < 1 or n_best < 1 or n_best > beam, "--beam must be >= 1 and --n-best between 1 and --beam"),
        ]
        for bad, message in problems:
            if bad:
                raise ConfigError(message)
        generator = None
        if seed_rng is not None:
            generator = torch.Generator(device=next(loaded.model.parameters()).device).manual_seed(seed_rng)

        def warn(message: str) -> None:
            typer.echo(message, err=True)

        def write(prompt: str) -> None:
            if loaded.config.kind == "seq2seq":
                translate_line(prompt)
                return
            for index in range(num_samples):
                if index:
                    typer.echo("\n---")
                typer.echo(prompt, nl=False)
                for piece in sample(loaded.model, loaded.tokenizer, prompt, options, generator=generator, warn=warn):
                    typer.echo(piece, nl=False)
                typer.echo()

        def translate_line(text: str) -> None:
            from lmzoo.translate import translate, translate_stream

            source, target = loaded.tokenizer, loaded.target_tokenizer
            limit = min(loaded.config.data.max_len, max_new_tokens or loaded.config.data.max_len)
            ids = encode_prompt(source, text, warn)  # warns about unseen pieces; translate() encodes again
            source_limit = getattr(loaded.config.model, "max_len", None)  # positions the encoder has
            if source_limit is not None and len(ids) + 1 > source_limit:
                warn(f"warning: the text is {len(ids) + 1} tokens long with <eos>, more than model.max_len "
                     f"{source_limit}; translating its first {source_limit - 1} tokens")
            if beam > 1:
                for hypothesis, score in translate(loaded.model, source, target, text, max_len=limit, beam=beam,
                                                   length_penalty=length_penalty, n_best=n_best,
                                                   max_source_len=source_limit):
                    typer.echo(f"{hypothesis}\t{score:.4f}" if n_best > 1 else hypothesis)
                return
            for _ in range(num_samples):
                for piece in translate_stream(loaded.model, source, target, text, max_len=limit, options=options,
                                              generator=generator, max_source_len=source_limit):
                    typer.echo(piece, nl=False)
                typer.echo()

        if seed is not None:
            write(seed)
            return
        verb = "translating with" if loaded.config.kind == "seq2seq" else "sampling from"
        typer.echo(f"lmzoo: {verb} {loaded.path} (type a text; 'exit' or Ctrl-D quits)", err=True)
        while True:
            try:
                prompt = input("seed> ")
            except EOFError:
                break
            if prompt.strip() == "exit":
                break
            write(prompt)


@app.command("eval")
def evaluate(
    run: str | None = typer.Option(None, "--run", "-r", help="Run directory or name (default: the newest run)."),
    data: Path | None = typer.Option(None, help="A text file to score (default: the run's split)."),
    split: str = typer.Option("val", help="Which split of the run's corpus when --data is not given: val or test."),
    checkpoint: str = typer.Option("best", help="Which checkpoint: best or last."),
    beam: int = typer.Option(5, help="Seq2seq: beam size for the beam-search BLEU (greedy BLEU is reported too)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
) -> None:
    """Print loss and perplexity on held-out text; for seq2seq runs also corpus BLEU, greedy and beam."""
    with user_errors():
        from lmzoo.checkpoint import resolve_run
        from lmzoo.evaluate import evaluate_run

        run_dir = resolve_run(run)
        metrics = evaluate_run(run_dir, data=data, split=split, checkpoint=checkpoint, device=device, beam=beam)
        source = str(data) if data else f"the {split} split"
        bleu = "".join(f"  BLEU {key[5:]} {value:.2f}" for key, value in metrics.items() if key.startswith("bleu_"))
        typer.echo(f"{run_dir} ({checkpoint}) on {source}: loss {metrics['loss']:.4f}  ppl {metrics['ppl']:.2f}{bleu}  "
                   f"({int(metrics['tokens']):,} tokens)")


@app.command()
def merge(
    run: str = typer.Option(..., "--run", "-r", help="A LoRA fine-tune run directory (or name under ./runs)."),
    out: Path | None = typer.Option(None, help="Where to write the merged run (default: <run>-merged beside it)."),
) -> None:
    """Fold a LoRA run's updates into its base weights: a plain run with the same outputs."""
    with user_errors():
        from lmzoo.checkpoint import merge_run, resolve_run

        merged = merge_run(resolve_run(run), out)
        typer.echo(f"merged: {merged}  (sample it with: lmzoo generate --run {merged})")


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
        typer.echo(f"(params: default config at a {REFERENCE_VOCAB}-token vocabulary, char-level Tiny Shakespeare)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
