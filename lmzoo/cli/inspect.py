"""Verbs that look inside a model: score (per-token probabilities of a text), attention (heat maps),
tokenize (a run's tokens, or char/word/BPE side by side), and the printing of `generate --show-probs`.

Terminal views use rich (typer's own dependency): tokens shaded from green (expected) to red
(surprising). Each verb parses, calls the library (lmzoo.inference.scoring, lmzoo.analysis.attention,
lmzoo.analysis.tokenizer_compare, lmzoo.analysis.plots) and prints.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import typer

from lmzoo.cli.app import BASE_HELP, DEVICE_HELP, RUN_HELP, app, user_errors, warn

CHECKPOINT_HELP = "Which checkpoint: best or last."


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True, markup=False)


def _shaded(text: str, badness: float) -> Any:
    """`text` on a background from green (badness 0) to red (1), for rich."""
    from rich.color import Color
    from rich.style import Style
    from rich.text import Text

    from lmzoo.analysis.plots import shade

    red, green, blue = (round(255 * c) for c in shade(badness))
    return Text(text, style=Style(bgcolor=Color.from_rgb(red, green, blue), color="black"))


def _visible(text: str) -> str:
    """A token for a table cell: spaces, line breaks and tabs made visible."""
    return text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u2423") or "\u2205"


# ---- score ---------------------------------------------------------------------------------------


@app.command()
def score(
    run: str | None = typer.Option(None, "--run", "-r", help=RUN_HELP),
    text: str | None = typer.Option(None, "--text", "-t", help="The text to score."),
    file: Path | None = typer.Option(None, "--file", "-f", help="A UTF-8 text file to score."),
    source: str | None = typer.Option(
        None, help="Seq2seq runs: the source sentence (the text is its target)."
    ),
    top_k: int = typer.Option(5, min=0, help="Alternatives to list for each token."),
    as_json: bool = typer.Option(False, "--json", help="One JSON record per token, then a summary record."),
    out: Path | None = typer.Option(None, help="Also write a PNG of the surprisal along the text."),
    checkpoint: str = typer.Option("best", help=CHECKPOINT_HELP),
    base: Path | None = typer.Option(None, help=BASE_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    knn: Path | None = typer.Option(None, help="Score with a kNN-LM datastore mixed in (lmzoo index)."),
    k: int = typer.Option(1024, help="--knn: neighbours per token."),
    lmbda: float = typer.Option(0.25, help="--knn: weight of the kNN distribution."),
    knn_temperature: float = typer.Option(1.0, help="--knn: p_kNN ~ exp(-distance / this)."),
) -> None:
    """Per-token log-probability, surprisal and rank of a text; loss, perplexity and bits per character.

    The loss equals `lmzoo eval --data` on the same text. For seq2seq runs, the target given --source.
    """
    with user_errors():
        from lmzoo.data.corpus import read_text_file
        from lmzoo.errors import ConfigError
        from lmzoo.run import Run

        if (text is None) == (file is None):
            raise ConfigError("pass the text to score as --text T or --file F (one of them)")
        loaded = Run.open(run, base=base)
        if knn is not None:
            from lmzoo.retrieval.interpolate import with_knn

            loaded = with_knn(loaded, knn, k=k, lmbda=lmbda, temperature=knn_temperature)
        where = dict(checkpoint_tag=checkpoint, device=device, top_k=top_k)
        if file is not None and source is None and loaded.kind != "seq2seq":  # from its prepared token file
            scored = loaded.score_file(file, **where)  # type: ignore[arg-type]
            unknown = sum(1 for token in scored.tokens if token.id == loaded.tokenizer.unk_id)
            if unknown:
                warn(f"warning: {unknown} token(s) of the text are not in the vocabulary; scored as <unk>")
        else:
            body = text if text is not None else read_text_file(file)  # type: ignore[arg-type]
            scored = loaded.score(body, source=source, **where)  # type: ignore[arg-type]
            unknown = len((loaded.target_tokenizer or loaded.tokenizer).unknown_pieces(body))
            if unknown:
                warn(f"warning: {unknown} piece(s) of the text are not in the vocabulary; scored as <unk>")
        if as_json:
            print_score_json(scored)
        else:
            print_score(scored)
        if out is not None:
            from lmzoo.analysis.plots import surprisal_plot

            warn(f"wrote {surprisal_plot(scored, out, title=f'{loaded.name} ({loaded.config.model.name})')}")


def print_score_json(scored: Any) -> None:
    """JSON Lines: one record per scored token (token, id, logprob, rank, top_logprobs), then a summary."""
    for item in scored.tokens:
        alternatives = [{"token": t, "id": i, "logprob": lp} for t, i, lp in item.top]
        record = {"token": item.text, "id": item.id, "position": item.position, "logprob": item.logprob}
        typer.echo(
            json.dumps({**record, "rank": item.rank, "top_logprobs": alternatives}, ensure_ascii=False)
        )
    summary = {
        "tokens": len(scored.tokens),
        "context_tokens": len(scored.context),
        "characters": scored.characters,
        "total_logprob": scored.total_logprob,
        "loss": scored.loss,
        "ppl": scored.ppl,
        "bits_per_char": scored.bits_per_char,
    }
    typer.echo(json.dumps({"summary": summary}))


def print_score(scored: Any, worst: int = 8) -> None:
    """The text with each token shaded by its surprisal, the totals, and the most surprising tokens."""
    from rich.table import Table
    from rich.text import Text

    from lmzoo.analysis.plots import SURPRISAL_CAP_BITS

    console = _console()
    pieces = [(pos, Text(piece, style="dim")) for pos, piece in scored.context]
    pieces += [
        (t.position, _shaded(t.text, -t.logprob / math.log(2) / SURPRISAL_CAP_BITS)) for t in scored.tokens
    ]
    console.print(Text.assemble(*(piece for _, piece in sorted(pieces, key=lambda p: p[0]))))
    console.print(
        f"\nloss {scored.loss:.4f} nats/token   ppl {scored.ppl:.2f}   {scored.bits_per_char:.4f} bits/char   "
        f"({len(scored.tokens)} tokens scored, {scored.characters} characters"
        + (f"; {len(scored.context)} read as context only, dim)" if scored.context else ")")
    )
    console.print(
        f"shade: surprisal -log2 p, green 0 bits -> red {SURPRISAL_CAP_BITS:.0f}+ bits", style="dim"
    )
    table = Table(title="most surprising tokens", title_justify="left", box=None)
    for column in ("token", "bits", "rank", "p", "model expected"):
        table.add_column(column, justify="left" if column in ("token", "model expected") else "right")
    for item in sorted(scored.tokens, key=lambda t: t.logprob)[:worst]:
        expected = "  ".join(f"{_visible(t)} {math.exp(lp):.2f}" for t, _, lp in item.top[:3])
        bits = -item.logprob / math.log(2)
        table.add_row(
            _visible(item.text), f"{bits:.2f}", str(item.rank), f"{math.exp(item.logprob):.3f}", expected
        )
    console.print(table)


# ---- generate --show-probs -------------------------------------------------------------------------


def print_generation_probs(
    run: Any,
    prompt: str,
    *,
    samples: int,
    top_logprobs: int,
    as_json: bool,
    beam: int,
    sampling: dict[str, Any],
    **options: Any,
) -> None:
    """`lmzoo generate --show-probs`: tokens shaded by probability and a table of each step's
    alternatives and entropy; with --json, one OpenAI-shaped `logprobs` record per sample."""
    from rich.table import Table
    from rich.text import Text

    from lmzoo.errors import ConfigError

    if beam > 1:
        raise ConfigError("--show-probs follows greedy or sampled decoding; leave --beam at 1")
    console = _console()
    for index in range(samples):
        decoded = list(run.decode(prompt, top_logprobs=top_logprobs, **options, **sampling))
        steps = [(step.text, step.probs) for step in decoded if step.probs is not None]
        if as_json:
            content = [step.to_openai() for _, step in steps]
            text = "".join(piece for piece, _ in steps)
            typer.echo(json.dumps({"prompt": prompt, "text": text, "logprobs": {"content": content}}))
            continue
        shown = [_shaded(piece, 1.0 - math.exp(step.logprob)) for piece, step in steps]
        console.print(("\n---\n" if index else "") + ("" if run.kind == "seq2seq" else prompt), end="")
        console.print(Text.assemble(*shown))
        table = Table(box=None, title="shade: probability, green 1 -> red 0", title_justify="left")
        for column in ("#", "token", "p", "entropy", "alternatives (p)"):
            table.add_column(column, justify="right" if column in ("#", "p", "entropy") else "left")
        for number, (_, step) in enumerate(steps, start=1):
            others = "  ".join(f"{_visible(t)} {math.exp(lp):.2f}" for t, _, lp in step.top)
            row = (
                str(number),
                _visible(step.token),
                f"{math.exp(step.logprob):.3f}",
                f"{step.entropy:.2f}",
                others,
            )
            table.add_row(*row)
        console.print(table)
        console.print(
            "entropy in nats; p from the model's distribution before sampling settings", style="dim"
        )


# ---- attention ---------------------------------------------------------------------------------------


@app.command()
def attention(
    run: str | None = typer.Option(None, "--run", "-r", help=RUN_HELP),
    text: str = typer.Option(..., "--text", "-t", help="The text (seq2seq: the source sentence)."),
    target: str | None = typer.Option(
        None, help="Seq2seq: the target sentence (default: the model's greedy translation)."
    ),
    layer: int | None = typer.Option(None, help="Only this attention layer (0 = the first of its kind)."),
    head: int | None = typer.Option(None, help="Only this head (0 = the first)."),
    which: str | None = typer.Option(
        None,
        help="self (encoder), decoder (masked self-attention) or cross (target over source); "
        "default: cross for seq2seq, the model's self-attention for language models.",
    ),
    fmt: str = typer.Option("png", "--format", help="png (a heat-map grid) or txt (the matrices)."),
    out: Path = typer.Option(Path("attention.png"), help="Where --format png writes."),
    checkpoint: str = typer.Option("best", help=CHECKPOINT_HELP),
    base: Path | None = typer.Option(None, help=BASE_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Attention weights of every layer and head on a text: a grid of heat maps, or the matrices."""
    with user_errors():
        from lmzoo.analysis.attention import attention_maps, format_matrix, select_maps
        from lmzoo.device import pick_device
        from lmzoo.errors import ConfigError
        from lmzoo.run import Run

        if fmt not in ("png", "txt"):
            raise ConfigError(f"--format must be png or txt, got {fmt!r}")
        loaded = Run.open(run, base=base)
        found = attention_maps(
            loaded, text, target=target, checkpoint_tag=checkpoint, device=pick_device(device), warn=warn
        )
        chosen = select_maps(found, which=which, layer=layer, head=head, kind=loaded.kind)
        if fmt == "txt":
            for item in chosen:
                for row, number in enumerate(item.heads or []):
                    typer.echo(f"{item.name} head {number} ({item.kind} attention; rows attend to columns)")
                    typer.echo(format_matrix(item, row) + "\n")
            return
        from lmzoo.analysis.plots import attention_grid

        title = f"{loaded.name} ({loaded.config.model.name}): {chosen[0].kind} attention"
        typer.echo(f"wrote {attention_grid(chosen, out, title=title)} ({len(chosen)} layer(s))")


# ---- tokenize ------------------------------------------------------------------------------------------


@app.command()
def tokenize(
    compare: bool = typer.Option(
        False, "--compare", help="Fit char, word and BPE tokenizers and compare them."
    ),
    data: Path | None = typer.Option(
        None, help="--compare: a text corpus (default: the config's, else Tiny Shakespeare)."
    ),
    config: Path | None = typer.Option(
        None, help="--compare: a run config; its data, and its tokenizer as one more row."
    ),
    bpe_size: list[int] | None = typer.Option(
        None, help="--compare: BPE vocabulary sizes (repeatable; default 512 1024 2048)."
    ),
    sample: str | None = typer.Option(
        None, help="--compare: the line to show tokenized (default: one from validation)."
    ),
    run: str | None = typer.Option(None, "--run", "-r", help=RUN_HELP),
    text: str | None = typer.Option(
        None, "--text", "-t", help="Without --compare: the text to tokenize with the run's tokenizer."
    ),
    progress: bool | None = typer.Option(
        None, "--progress/--no-progress", help="Progress bar (default: on a terminal)."
    ),
) -> None:
    """Show how a run's tokenizer splits a text, or (--compare) char, word and BPE side by side."""
    with user_errors():
        from lmzoo.errors import ConfigError

        if not compare:
            if text is None:
                raise ConfigError("pass --text T to see how a run's tokenizer splits it, or --compare")
            print_tokens(text, run)
            return
        from lmzoo.analysis.tokenizer_compare import (
            DEFAULT_BPE_SIZES,
            compare_tokenizers,
            standard_tokenizers,
        )

        data_config, extra = _compare_inputs(data, config)
        candidates = standard_tokenizers(tuple(bpe_size or DEFAULT_BPE_SIZES)) + extra
        show = sys.stderr.isatty() if progress is None else progress
        rows, line = compare_tokenizers(data_config, candidates, sample=sample, progress=show)
        print_tokenizer_table(rows, line)


def print_tokens(text: str, run: str | None) -> None:
    from lmzoo.analysis.attention import token_label
    from lmzoo.inference.text import token_text
    from lmzoo.run import Run

    tokenizer = Run.open(run).tokenizer
    ids = tokenizer.encode(text)
    typer.echo("|".join(token_label(token_text(tokenizer, i)) for i in ids))
    typer.echo(f"{len(ids)} tokens, {len(text) / max(1, len(ids)):.2f} characters per token; ids: {ids}")


def _compare_inputs(data: Path | None, config: Path | None) -> tuple[Any, list[tuple[str, Any]]]:
    """The data section to fit on, and the config's own tokenizer as an extra row."""
    from pydantic import ValidationError

    from lmzoo.config.errors import describe
    from lmzoo.config.schema import DataConfig
    from lmzoo.errors import ConfigError
    from lmzoo.run import load_config

    extra: list[tuple[str, Any]] = []
    section: dict[str, Any] = {}
    if config is not None:
        loaded = load_config(config)
        if loaded.data.format != "text":
            raise ConfigError(f"{config}: tokenize --compare reads text corpora (data.format text)")
        section = loaded.data.model_dump()
        extra.append((f"config ({loaded.tokenizer.kind})", loaded.tokenizer))
    if data is not None:
        section.update(train=str(data), val=None, test=None)
    try:
        return DataConfig.model_validate(section), extra
    except ValidationError as err:
        raise ConfigError(describe(err, DataConfig, ("data",))) from None


def print_tokenizer_table(rows: list[Any], line: str) -> None:
    from rich.table import Table

    table = Table(
        title="tokenizers fitted on the training split, measured on validation", title_justify="left"
    )
    for column in ("tokenizer", "vocab", "chars/token", "unknown", "encode chars/s", "fit s"):
        table.add_column(column, justify="left" if column == "tokenizer" else "right")
    for row in rows:
        table.add_row(
            row.name,
            f"{row.vocab_size:,}",
            f"{row.chars_per_token:.2f}",
            f"{100 * row.unknown_share:.2f}%",
            f"{row.chars_per_second:,.0f}",
            f"{row.fit_seconds:.2f}",
        )
    console = _console()
    console.print(table)
    console.print(f"\nsample line: {line!r}")
    width = max(len(row.name) for row in rows)
    for row in rows:
        console.print(f"{row.name:<{width}}  {len(row.sample):>3} tokens  " + "|".join(row.sample))
