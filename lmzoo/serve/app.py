"""The Starlette app: OpenAI-compatible /v1 routes, the remote-tokenizer routes of lm-evaluation-harness
and the MCP endpoint at /mcp, behind one Guard.

GET  /v1/models              the runs under --runs that have a checkpoint
GET  /v1/models/{model}      one of them
POST /v1/completions         continue (or, seq2seq runs, translate) a prompt; stream, logprobs, echo
POST /v1/chat/completions    answer a conversation, rendered with the run's chat template
GET  /tokenizer_info         a run's special tokens (lm-eval's remote tokenizer; lmzoo.serve.tokenize)
POST /tokenize, /detokenize  text <-> a run's token ids
GET  /status                 each loaded run's engine: slots, sequences decoding and waiting, steps
POST /mcp                    MCP over streamable HTTP (the tools of lmzoo.serve.mcp)

Every route but /mcp and /status is also served under /runs/{model}/ (e.g. /runs/gpt/v1/completions),
where the body's `model` may be left out: a client that derives its other URLs from the completions
URL (lm-eval's remote tokenizer does) then reaches that run's tokenizer.
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lmzoo.serve.chat import ChatFormat, chat_plan
from lmzoo.serve.completions import Choices, Completion, CompletionFormat, Meta, Plan, completion_plan
from lmzoo.serve.errors import APIError, Cancelled, bad_request
from lmzoo.serve.guard import Guard, is_loopback
from lmzoo.serve.limits import Limits
from lmzoo.serve.runs import RunRegistry
from lmzoo.serve.schema import SamplingRequest, parse_chat_request, parse_request
from lmzoo.serve.tokenize import (
    DetokenizeRequest,
    TokenizeRequest,
    detokenize,
    parse,
    tokenize,
    tokenizer_info,
)

DONE = "data: [DONE]\n\n"
Format = CompletionFormat | ChatFormat

if TYPE_CHECKING:
    from lmzoo.run import Run


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

    per_run = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/tokenizer_info", get_tokenizer_info, methods=["GET"]),
        Route("/tokenize", post_tokenize, methods=["POST"]),
        Route("/detokenize", post_detokenize, methods=["POST"]),
    ]
    app = Starlette(
        routes=[
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model}", get_model, methods=["GET"]),
            *per_run,
            *[Route("/runs/{model}" + r.path, r.endpoint, methods=r.methods) for r in per_run],
            Route("/status", status, methods=["GET"]),
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


# ---- /v1/completions and /v1/chat/completions ------------------------------------------------------


async def completions(request: Request) -> Response:
    registry = _registry(request)
    body = parse_request(await request.body(), registry.limits, request.path_params.get("model"))
    return await _generate(request, body, lambda run: completion_plan(run, body), CompletionFormat())


async def chat_completions(request: Request) -> Response:
    registry = _registry(request)
    body = parse_chat_request(await request.body(), registry.limits, request.path_params.get("model"))
    return await _generate(request, body, lambda run: chat_plan(run, body), ChatFormat(body.logprobs))


async def _generate(
    request: Request, body: SamplingRequest, plan_for: Callable[[Run], Plan], shape: Format
) -> Response:
    """Decode the request's choices on its run's engine; the whole response, or server-sent events."""
    registry = _registry(request)
    registry.locate(body.model)  # an unknown or unsafe name is refused before any work
    meta = Meta(f"{shape.prefix}-{uuid.uuid4().hex}", int(time.time()), body.model)
    if body.stream:
        return await _stream(registry, body, plan_for, shape, meta)
    choices = Choices(registry, registry.budget(), body.model, plan_for)
    task = asyncio.ensure_future(choices.run())
    try:
        finished = await _done_unless_client_leaves(request, task)
    finally:
        if not task.done():  # the client left (or this handler was cancelled)
            choices.cancel()  # the engine frees the slots at its next step
            task.cancel()
    if not finished:
        return Response(status_code=499)  # nobody reads it: the client closed the connection
    return JSONResponse(shape.body(task.result(), meta))


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


async def _stream(
    registry: RunRegistry, body: SamplingRequest, plan_for: Callable[[Run], Plan], shape: Format, meta: Meta
) -> Response:
    """Pieces as they decode; an error found before the first piece still gets its status code."""
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def on_piece(index: int, piece: str, step: Any, block: Any) -> None:  # on the event loop
        event = shape.piece(meta, index, piece, step, block)
        if event is not None:
            queue.put_nowait(event)

    choices = Choices(registry, registry.budget(), body.model, plan_for, on_piece)
    try:
        await choices.start()  # checked, loaded, submitted: errors so far are plain responses
    except BaseException:
        choices.cancel()
        raise
    assert choices.plan is not None
    opening = shape.opening(choices.plan, meta)
    task = asyncio.ensure_future(choices.finish())
    task.add_done_callback(lambda _: queue.put_nowait(None))

    async def events() -> AsyncIterator[str]:
        for event in opening:
            yield _sse(event)
        while (item := await queue.get()) is not None:
            yield _sse(item)
        try:
            completion: Completion = task.result()
        except Cancelled:
            return
        except APIError as err:
            yield _sse(err.body())
            yield DONE
            return
        for event in shape.closing(completion, meta):
            yield _sse(event)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield _sse(shape.usage(completion, meta))
        yield DONE

    def cleanup() -> None:
        choices.cancel()
        task.cancel()

    return EventStream(events(), cleanup)


# ---- the remote tokenizer, and the engines' state ---------------------------------------------------


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        raw = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as err:
        raise bad_request(f"the request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    return raw


def _run_named(request: Request, given: Any) -> Run:
    """The run of the route (/runs/NAME/...), of the request's `model`, or the only run served."""
    registry = _registry(request)
    name = request.path_params.get("model") or given
    if name is None:
        names = registry.names()
        if len(names) != 1:
            raise bad_request(
                f"name the run: this server serves {len(names)} runs; pass model (or ?model=NAME), or "
                "use the run's own routes: /runs/NAME/tokenize",
                "model",
            )
        name = names[0]
    return registry.opened(name)


async def get_tokenizer_info(request: Request) -> Response:
    return JSONResponse(tokenizer_info(_run_named(request, request.query_params.get("model"))))


async def post_tokenize(request: Request) -> Response:
    body = parse(TokenizeRequest, await _json_body(request))
    return JSONResponse(tokenize(_run_named(request, body.model), body))


async def post_detokenize(request: Request) -> Response:
    body = parse(DetokenizeRequest, await _json_body(request))
    return JSONResponse(detokenize(_run_named(request, body.model), body))


async def status(request: Request) -> Response:
    engines = _registry(request).engines()
    runs = {
        name: {"slots": e.capacity, "active": e.active, "queued": e.queued, "steps": e.steps}
        for name, e in engines.items()
    }
    return JSONResponse({"runs": runs})
