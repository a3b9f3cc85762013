"""What one request may ask of the server: sizes, counts and time, each with a default printed at start."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from lmzoo.errors import ConfigError


@dataclass(frozen=True)
class Limits:
    """Per-request bounds. A request over one gets a 400 (413 for the body) that names the limit."""

    max_body_bytes: int = 1_000_000  # the whole HTTP request body (MCP too)
    max_prompt_chars: int = 20_000  # each prompt (or text to score)
    max_prompt_tokens: int = 20_000  # each prompt given as token ids
    max_prompts: int = 16  # prompts in one request (a list prompt)
    max_tokens: int = 1024  # tokens generated per choice
    max_n: int = 8  # choices per prompt
    max_logprobs: int = 20  # top alternatives per token
    max_stops: int = 16  # stop strings per request (lm-evaluation-harness tasks send several)
    slots: int = 32  # sequences each loaded run decodes together (its batch)
    max_queue: int = 256  # sequences waiting for a slot, per run; beyond it a request gets 429
    timeout_s: float = 60.0  # wall time of one request, waiting for its model and a slot included
    shutdown_grace_s: float = 5.0  # on SIGINT/SIGTERM, in-flight requests get this long before they are cut
    workers: int = 32  # threads for loading, scoring and the MCP tools (decoding runs in each run's engine)

    def describe(self) -> str:
        """One line of `name=value` pairs, as printed when the server starts."""
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))

    def with_overrides(self, items: list[str]) -> Limits:
        """`name=value` strings (from `--limit`) on top of these limits; a bad one is a ConfigError."""
        known = {f.name: f.type for f in fields(self)}
        changes: dict[str, float | int] = {}
        for item in items:
            name, sep, text = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in known:
                raise ConfigError(
                    f"--limit {item!r}: expected NAME=VALUE with NAME one of {', '.join(known)}"
                )
            try:
                value = float(text) if known[name] in ("float", float) else int(text)
            except ValueError:
                raise ConfigError(f"--limit {item!r}: {text!r} is not a number") from None
            if value <= 0:
                raise ConfigError(f"--limit {item!r}: must be positive")
            changes[name] = value
        return replace(self, **changes)  # type: ignore[arg-type]  # each value was parsed as its field's type
