"""`lmzoo serve`: the runs of a folder over an OpenAI-compatible HTTP API and MCP (lmzoo.serve)."""

from __future__ import annotations

from pathlib import Path

import typer

from lmzoo.cli.app import DEVICE_HELP, app, user_errors


@app.command()
def serve(
    runs: Path = typer.Option(
        Path("runs"), "--runs", help="Folder of runs; a request names a run by its name."
    ),
    host: str = typer.Option(
        "127.0.0.1", help="Interface to bind (anything but loopback is reachable by others)."
    ),
    port: int = typer.Option(8000, help="TCP port."),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        envvar="LMZOO_API_KEY",
        help="Require 'Authorization: Bearer KEY' everywhere (MCP too).",
    ),
    cache_size: int = typer.Option(2, min=1, help="Runs kept loaded; the least recently used is dropped."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    limit: list[str] | None = typer.Option(
        None,
        "--limit",
        help="Change a limit, e.g. --limit timeout_s=30 --limit max_tokens=256 (see the start line).",
    ),
    mcp_stdio: bool = typer.Option(False, "--mcp-stdio", help="Serve MCP over stdin/stdout instead of HTTP."),
    rag_index: Path | None = typer.Option(
        None, "--rag-index", help="A passage index (lmzoo rag index) for the MCP retrieve tool."
    ),
) -> None:
    """Serve trained runs: OpenAI-compatible /v1/completions and /v1/models, and MCP at /mcp (or stdio)."""
    with user_errors():
        from lmzoo.serve.limits import Limits
        from lmzoo.serve.server import require_dependencies, serve_http, serve_stdio

        require_dependencies()
        limits = Limits().with_overrides(limit or [])
        if mcp_stdio:
            serve_stdio(runs, limits=limits, cache_size=cache_size, device=device, rag_index=rag_index)
            return
        serve_http(
            runs,
            host=host,
            port=port,
            api_key=api_key,
            limits=limits,
            cache_size=cache_size,
            device=device,
            rag_index=rag_index,
        )
