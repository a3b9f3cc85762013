"""The Starlette app: OpenAI-compatible /v1 routes and the MCP endpoint at /mcp, behind one Guard.

GET  /v1/models             the runs under --runs that have a checkpoint
GET  /v1/models/{model}     one of them
POST /v1/completions        continue (or, seq2seq runs, translate) a prompt; stream, logprobs, echo
POST /mcp                   MCP over streamable HTTP (the tools of lmzoo.serve.mcp)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lmzoo.serve.completions import chunk, complete, completion_body
from lmzoo.serve.errors import APIError, Cancelled
from lmzoo.serve.guard import Guard, is_loopback
from lmzoo.serve.limits import Limits
from lmzoo.serve.runs import Budget, RunRegistry
from lmzoo.serve.schema import CompletionRequest, parse_request

DONE = "data: [DONE]\n\n"


def create_app(
    runs_dir: str | Path,
    *,
    api_key: str | None = None,
    limits: Limits | None = None,
    cache_size: int = 2,
    device: str = "auto",
    host: str = "127.0.0.1",
    rag_index: str | Path | None = None,
) -> Starlette:
    """The ASGI app serving the runs under `runs_dir` (HTTP API and MCP); `app.state.registry` holds them.
    `rag_index`: a passage index (`lmzoo rag index`) for the MCP `retrieve` tool."""
    from mcp.server.transport_security import TransportSecuritySettings

    from lmzoo.serve.mcp import build_mcp_server

    limits = limits or Limits()
    registry = RunRegistry(runs_dir, limits=limits, cache_size=cache_size, device=device)
    server = build_mcp_server(registry, rag_index)
    mcp_app = server.streamable_http_app(
        streamable_http_path="/mcp",
        stateless_http=True,
        json_response=True,
        max_request_body_size=limits.max_body_bytes,
        # the Guard checks Host for every route (the SDK's own check would refuse a portless Host)
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            async with server.session_manager.run():
                yield
        finally:
            registry.close()

    app = Starlette(
        routes=[
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model}", get_model, methods=["GET"]),
            Route("/v1/completions", completions, methods=["POST"]),
            *mcp_app.routes,
        ],
        middleware=[
            Middleware(
                Guard, api_key=api_key, max_body=limits.max_body_bytes, loopback_only=is_loopback(host)
            )
        ],
        exception_handlers={APIError: api_error, HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )
    app.state.registry = registry
    return app


# ---- errors -------------------------------------------------------------------------------------


async def api_error(request: Request, err: Exception) -> Response:
    assert isinstance(err, APIError)
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def http_error(request: Request, err: Exception) -> Response:
    assert isinstance(err, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
    message = f"{request.method} {request.url.path}: {err.detail}"
    return await api_error(request, APIError(err.status_code, message, code=code))


async def internal_error(request: Request, err: Exception) -> Response:
    traceback.print_exception(err, file=sys.stderr)
    return await api_error(request, APIError(500, "internal server error (logged by the server)"))


# ---- /v1/models ---------------------------------------------------------------------------------


def _registry(request: Request) -> RunRegistry:
    return request.app.state.registry


def _model_card(registry: RunRegistry, name: str) -> dict[str, Any]:
    from lmzoo.run import Run

    created = int(Run.checkpoint_time_at(registry.locate(name)))
    return {"id": name, "object": "model", "created": created, "owned_by": "lmzoo"}


async def list_models(request: Request) -> Response:
    registry = _registry(request)
    cards = []
    for name in registry.names():
        with contextlib.suppress(APIError, OSError):  # removed while listing
            cards.append(_model_card(registry, name))
    return JSONResponse({"object": "list", "data": cards})


async def get_model(request: Request) -> Response:
    return JSONResponse(_model_card(_registry(request), request.path_params["model"]))


# ---- /v1/completions ----------------------------------------------------------------------------


async def completions(request: Request) -> Response:
    registry = _registry(request)
    body = parse_request(await request.body(), registry.limits)
    registry.locate(body.model)  # an unknown or unsafe name is refused before any work
    budget = registry.budget()
    meta: dict[str, Any] = dict(cid=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model)
    if body.stream:
        return await stream_completion(registry, body, budget, **meta)
    work = partial(complete, request=body, device=registry.device)
    task = asyncio.ensure_future(registry.call(body.model, work, budget))
    try:
        finished = await _done_unless_client_leaves(request, task)
    finally:
        if not task.done():  # the client left (or this handler was cancelled)
            budget.cancel()  # the worker stops at its next step and frees the run's lock
            task.cancel()
    if not finished:
        return Response(status_code=499)  # nobody reads it: the client closed the connection
    return JSONResponse(completion_body(task.result(), **meta))


async def _done_unless_client_leaves(request: Request, task: asyncio.Future[Any]) -> bool:
    """Wait for `task`; False as soon as the client disconnects first (the body was read already, so
    the next ASGI message is http.disconnect, which the server sends when the connection closes)."""

    async def client_gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and watcher.exception() is not None:  # the server cannot tell: just wait
            await asyncio.wait({task})
    finally:
        watcher.cancel()
    return task.done()


class EventStream(StreamingResponse):
    """Server-sent events whose `cleanup` runs however the response ends (done, error, client gone)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], cleanup: Callable[[], None]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cleanup()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def stream_completion(
    registry: RunRegistry, body: CompletionRequest, budget: Budget, *, cid: str, created: int, model: str
) -> Response:
    """Pieces as they decode; an error found before the first piece still gets its status code."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, str, Any] | None] = asyncio.Queue()

    def on_piece(index: int, piece: str, logprobs: Any) -> None:  # in the worker thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (index, piece, logprobs))
        except RuntimeError:  # the loop is closed: nobody is listening
            raise Cancelled() from None

    work = partial(complete, request=body, device=registry.device, on_piece=on_piece)
    task = asyncio.ensure_future(registry.call(body.model, work, budget))
    task.add_done_callback(lambda _: queue.put_nowait(None))

    def cleanup() -> None:
        budget.cancel()
        task.cancel()

    try:
        first = await queue.get()
        if first is None:  # failed before it started: a plain error response
            task.result()
            raise APIError(500, "the completion ended before it started")
    except BaseException:
        cleanup()
        raise

    async def events() -> AsyncIterator[str]:
        while (item := await queue.get()) is not None:
            index, piece, logprobs = item
            if index >= 0 and (piece or logprobs):
                yield _sse(chunk(cid, created, model, index, piece, None, logprobs))
        try:
            completion = task.result()
        except Cancelled:
            return
        except APIError as err:
            yield _sse(err.body())
            yield DONE
            return
        for choice in completion.choices:
            yield _sse(chunk(cid, created, model, choice.index, "", choice.finish_reason))
        if body.stream_options is not None and body.stream_options.include_usage:
            counts = completion_body(completion, cid=cid, created=created, model=model)["usage"]
            yield _sse({**chunk(cid, created, model, 0, "", None), "choices": [], "usage": counts})
        yield DONE

    return EventStream(events(), cleanup)
