"""The MCP server (official `mcp` SDK 2.x, its high-level `MCPServer`): read-only tools over the runs.

Tools (lmzoo.serve.tools): list_runs, describe_run, generate, score, next_tokens, translate, and
retrieve when the server was given a passage index (`lmzoo rag index`; `lmzoo serve --rag-index DIR`).
Resources: the list of runs, and each run's config (YAML) and metrics (JSON lines). No tool trains
or writes; each runs under the same registry, limits, locks and timeout as the HTTP API.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmzoo import __version__
from lmzoo.serve.errors import APIError
from lmzoo.serve.runs import RunRegistry

if TYPE_CHECKING:
    from lmzoo.run import Run

METRICS_LINES = 5000  # the metrics resource gives at most the last this many records


def build_mcp_server(registry: RunRegistry, rag_index: str | Path | None = None) -> Any:
    """An MCPServer whose tools and resources read the runs of `registry` (and the passage index)."""
    from mcp.server.mcpserver import MCPServer
    from mcp.types import ToolAnnotations

    from lmzoo.serve.tools import PassageTool, RunTools

    server = MCPServer(
        "lmzoo",
        version=__version__,
        instructions="Language models trained with lmzoo: list them, sample, score text, inspect next tokens.",
        log_level="WARNING",
    )
    read_only = ToolAnnotations(
        read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
    )
    tools = RunTools(registry).all()
    if rag_index is not None:
        tools.append(PassageTool(Path(rag_index)).retrieve)
    for tool in tools:
        server.add_tool(tool, annotations=read_only)
    _add_resources(server, registry)
    return server


def _add_resources(server: Any, registry: RunRegistry) -> None:
    from mcp.server.mcpserver.exceptions import ResourceNotFoundError

    def opened(name: str) -> Run:
        try:
            return registry.open(name)
        except APIError as err:
            raise ResourceNotFoundError(err.message) from None

    @server.resource("lmzoo://runs", mime_type="application/json", description="The names of the served runs")
    def runs() -> str:
        return json.dumps(registry.names())

    @server.resource("lmzoo://runs/{name}/config", mime_type="application/yaml", description="A run's config")
    def run_config(name: str) -> str:
        return opened(name).config_text()

    @server.resource(
        "lmzoo://runs/{name}/metrics", mime_type="application/jsonl", description="A run's metrics.jsonl"
    )
    def run_metrics(name: str) -> str:
        records = opened(name).metrics()[-METRICS_LINES:]
        return "".join(json.dumps(r) + "\n" for r in records)
