"""Running the app: uvicorn on a host and port (graceful on SIGINT/SIGTERM), or MCP over stdio.

On a signal, uvicorn stops accepting connections and waits for the ones in flight; the registry
gives running requests `shutdown_grace_s` more seconds, then cuts them with an error, and the
process exits 0.
"""

from __future__ import annotations

import importlib.util
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from lmzoo.errors import ConfigError
from lmzoo.serve.limits import Limits

INSTALL_HINT = "pip install 'lmzoo[serve]'"


def require_dependencies() -> None:
    """One clear line when the `serve` extra is not installed."""
    missing = [name for name in ("mcp", "uvicorn", "starlette") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"lmzoo serve needs {', '.join(missing)}; install them with: {INSTALL_HINT}")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _banner(registry: Any, where: str, cache_size: int) -> None:
    names = registry.names()
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    _say(f"lmzoo serve: {len(names)} run(s) under {registry.root}: {shown or '(none yet)'}")
    _say(f"lmzoo serve: {where}")
    limits = registry.limits
    _say(
        f"lmzoo serve: each run decodes up to {limits.slots} sequences together (slots), "
        f"{limits.max_queue} more may wait (max_queue), at most {limits.max_tokens} tokens each (max_tokens)"
    )
    _say(f"lmzoo serve: limits {limits.describe()} cache_size={cache_size}")


def serve_http(
    runs_dir: str | Path,
    *,
    host: str,
    port: int,
    api_key: str | None,
    limits: Limits,
    cache_size: int,
    device: str,
    rag_index: Path | None = None,
) -> None:
    """Serve /v1 and /mcp with uvicorn until SIGINT/SIGTERM; returns normally (exit 0) after either."""
    import uvicorn

    try:  # a port in use or a host that is not ours: one line and exit 2, before loading anything
        socket.create_server((host, port)).close()
    except OSError as err:
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None

    from lmzoo.serve.app import create_app
    from lmzoo.serve.guard import is_loopback

    app = create_app(
        runs_dir,
        api_key=api_key,
        limits=limits,
        cache_size=cache_size,
        device=device,
        host=host,
        rag_index=rag_index,
    )
    registry = app.state.registry
    if not is_loopback(host) and api_key is None:
        _say(f"warning: binding {host} without --api-key: anyone who can reach this port can use the models")
    base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    _banner(registry, f"OpenAI-compatible API at {base}/v1, MCP at {base}/mcp", cache_size)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            registry.shutdown.begin(limits.shutdown_grace_s)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=int(limits.shutdown_grace_s) + 2,
    )
    # uvicorn re-raises the signal it handled once it has stopped; a stop we asked for is a clean exit.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    Server(config).run()
    _say("lmzoo serve: stopped")


def serve_stdio(
    runs_dir: str | Path, *, limits: Limits, cache_size: int, device: str, rag_index: Path | None = None
) -> None:
    """MCP over stdin/stdout (for clients that launch the server); ends when stdin closes."""
    from lmzoo.serve.mcp import build_mcp_server
    from lmzoo.serve.runs import RunRegistry

    registry = RunRegistry(runs_dir, limits=limits, cache_size=cache_size, device=device)
    _banner(registry, "MCP over stdio", cache_size)
    try:
        build_mcp_server(registry, rag_index).run("stdio")
    finally:
        registry.close()
