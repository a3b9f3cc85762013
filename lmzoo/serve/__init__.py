"""Serving trained runs: an OpenAI-compatible HTTP API (/v1) and an MCP server (/mcp, or stdio).

    from lmzoo.serve import create_app
    app = create_app("runs", api_key=None)     # an ASGI app: uvicorn, or an in-process test client

`lmzoo serve --runs DIR` runs it (lmzoo.serve.server). Needs the `serve` extra
(`pip install 'lmzoo[serve]'`); nothing here imports it until create_app is called.
"""

from __future__ import annotations

from typing import Any

from lmzoo.serve.limits import Limits

__all__ = ["Limits", "create_app"]


def __getattr__(name: str) -> Any:
    """`create_app` is lmzoo.serve.app's, imported on first use (it needs the `serve` extra)."""
    if name == "create_app":
        from lmzoo.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'lmzoo.serve' has no attribute {name!r}")
