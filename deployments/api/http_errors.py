"""Mapping every failure to one error shape at the HTTP edge, and the body-size guard.

OpenAI routes answer `{"error": {message, type, param, code}}`; TF-Serving routes answer
`{"error": "..."}`. A 500 carries a generic message and the request id, never a traceback.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayTaskError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.errors import InvalidRequest, ModelNotFound, RequestTooLarge, ShardserveError

logger = logging.getLogger("ray.serve")

_TF_ROUTE = re.compile(r"^/v1/models/[^/]+(/versions/[^/]+|/labels/[^/]+)?(:predict|/metadata)?$")


def unwrap(exc: BaseException) -> BaseException:
    """The original exception behind a Ray task error (errors raised in another replica)."""
    while isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause
    return exc


def is_tf_route(path: str) -> bool:
    return bool(_TF_ROUTE.match(path))


def error_response(request: Request, exc: BaseException) -> JSONResponse:
    exc = unwrap(exc)
    if not isinstance(exc, ShardserveError):
        request_id = uuid.uuid4().hex
        logger.error("unhandled error (request %s)", request_id, exc_info=exc)
        exc = ShardserveError(f"internal server error (request id {request_id})", code="internal_error")
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    body: dict[str, Any] = {"error": exc.message} if is_tf_route(request.url.path) else exc.to_openai()
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid request")
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(request, InvalidRequest(message, param=param))

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(request, ModelNotFound(f"no route {request.url.path}", param=None, code="not_found"))
        err = ShardserveError(str(exc.detail))
        err.status_code = exc.status_code
        err.error_type = "invalid_request_error"
        return error_response(request, err)

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request, exc)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(ShardserveError, on_error)
    app.add_exception_handler(RayTaskError, on_error)
    app.add_exception_handler(Exception, on_error)


class HttpMetrics:
    """ASGI middleware counting every response by route template and status, timed to its last
    byte (so a stream counts its whole length). Unmatched paths share one label, so a scan of
    random URLs cannot blow up the number of series."""

    def __init__(self, app: ASGIApp, record: Callable[[str, int, float], None]) -> None:
        self.app = app
        self.record = record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.monotonic(), 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.record(route, status, time.monotonic() - started)


class RequestGuard:
    """ASGI middleware in front of every route.

    - 413 before parsing when the body is larger than the limit: Content-Length is checked up
      front, a chunked body is counted as it arrives.
    - Bodies are JSON whatever the Content-Type says: curl's `-d` and many TF-Serving clients
      send none or a form type.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
        # In place: the router records the matched route in this same dict for the metrics.
        scope["headers"] = [*headers, (b"content-type", b"application/json")]
        length = dict(headers).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._error()
            return message

        await self.app(scope, counting_receive, send)

    def _error(self) -> RequestTooLarge:
        return RequestTooLarge(f"request body is larger than {self.max_bytes} bytes", code="request_too_large")

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(Request(scope, receive), self._error())
        await response(scope, receive, send)
