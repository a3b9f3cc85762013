"""Errors a request can meet, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Status codes: 400 a request that is malformed, of the wrong type or over a limit; 401 a missing or
wrong API key; 404 an unknown run or route; 405 a wrong method; 413 a body over the size limit;
421 a Host header that is not this server; 429 the model's queue is full (try again shortly); 503
shutting down; 504 the request ran past its timeout; 500 only for a fault of the server itself, never
for anything a request says.
"""

from __future__ import annotations

from typing import Any

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    421: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


class APIError(Exception):
    """An error that becomes one OpenAI-shaped JSON response (or one MCP tool error)."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class Cancelled(Exception):
    """The client went away; the work stops quietly at its next step."""


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(message: str, param: str | None = "model", code: str = "model_not_found") -> APIError:
    return APIError(404, message, param=param, code=code)


def timed_out(seconds: float) -> APIError:
    return APIError(504, f"the request ran past this server's {seconds:g} s limit", code="timeout")


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; the request was cut", code="shutting_down")
