"""The checks every HTTP request passes before any route (MCP too): Host, API key, body size.

A pure ASGI middleware, so a streamed response is untouched. The body is read here, at most
`max_body` bytes of it, and handed on; a larger one is a 413 without reading the rest.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmzoo.serve.errors import APIError

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS


def _host_name(header: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1'; '[::1]:8000' -> '[::1]'."""
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """Refuses a foreign Host (loopback servers: DNS rebinding), a missing/wrong key, an oversized body."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body: int, loopback_only: bool) -> None:
        self.app, self.max_body, self.loopback_only = app, max_body, loopback_only
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            self._check_headers(headers)
            body = await self._read_body(headers, receive)
        except APIError as err:
            await _send_error(send, err)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _check_headers(self, headers: Headers) -> None:
        if self.loopback_only and _host_name(headers.get("host", "")) not in LOOPBACK_HOSTS:
            raise APIError(
                421, "this server answers only requests addressed to the loopback host", code="bad_host"
            )
        if self.expected is not None:
            given = headers.get("authorization", "").encode()
            if not given:
                raise APIError(
                    401, "missing API key: send Authorization: Bearer <key>", code="missing_api_key"
                )
            if not hmac.compare_digest(given, self.expected):
                raise APIError(401, "wrong API key", code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            raise self._too_large()

    async def _read_body(self, headers: Headers, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _too_large(self) -> APIError:
        return APIError(
            413,
            f"the request body is over this server's limit of {self.max_body} bytes",
            code="body_too_large",
        )


async def _send_error(send: Send, err: APIError) -> None:
    payload = json.dumps(err.body()).encode()
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    if err.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})
