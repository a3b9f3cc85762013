"""`lmzoo generate --chat`: a conversation in the terminal on the run's chat template (the one
/v1/chat/completions uses: lmzoo.inference.chat), each reply streamed as it decodes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from lmzoo.cli.app import prompts, warn

if TYPE_CHECKING:
    from lmzoo.run import Run


def chat_in_terminal(
    run: Run,
    message: str | None,
    system: str | None,
    sampling: dict[str, Any],
    *,
    seed: int | None,
    checkpoint: str,
    device: str,
) -> None:
    """Answer `message`, or (without one) each line typed until 'exit' or Ctrl-D, keeping the
    conversation; the reply ends at the template's stops, the given --stop strings or <eos>."""
    template = run.chat_template()
    stops = list(dict.fromkeys([*template.stops, *(sampling.get("stop") or [])]))
    options = {**sampling, "stop": stops}
    history: list[tuple[str, str]] = [("system", system)] if system else []
    told: set[str] = set()
    verb = f"chatting with {run.path} ({template.name} template)"
    for index, text in enumerate(prompts(message, verb, "you> ")):
        history.append(("user", text))
        ids, unknown = template.render(history, run.tokenizer)
        if set(unknown) - told:
            told |= set(unknown)
            shown = ", ".join(repr(p) for p in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            warn(f"warning: {len(unknown)} piece(s) not in the vocabulary ({shown}); read as <unk>")
        reply = []
        for step in run.decode(
            ids,
            checkpoint_tag=checkpoint,
            device=device,
            seed=None if seed is None else seed + index,
            **options,
        ):
            typer.echo(step.text, nl=False)
            reply.append(step.text)
        typer.echo()
        history.append(("assistant", "".join(reply)))
