"""Serving trained runs: an OpenAI-compatible HTTP API (/v1) and an MCP server (/mcp, or stdio).

    from lmzoo.serve import create_app
    app = create_app("runs", api_key=None)     # an ASGI app: uvicorn, or an in-process test client

`lmzoo serve --runs DIR` runs it (lmzoo.serve.server). Needs the `serve` extra
(`pip install 'lmzoo[serve]'`); nothing here imports it until create_app is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmzoo.serve.limits import Limits

__all__ = ["Limits", "create_app"]


def create_app(
    runs_dir: str | Path,
    *,
    api_key: str | None = None,
    limits: Limits | None = None,
    cache_size: int = 2,
    device: str = "auto",
    host: str = "127.0.0.1",
    rag_index: str | Path | None = None,
) -> Any:
    """The Starlette app serving the runs under `runs_dir` (see lmzoo.serve.app.create_app)."""
    from lmzoo.serve.app import create_app as make_app

    return make_app(
        runs_dir,
        api_key=api_key,
        limits=limits,
        cache_size=cache_size,
        device=device,
        host=host,
        rag_index=rag_index,
    )
