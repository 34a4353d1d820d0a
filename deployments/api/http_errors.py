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

from deployments.api.json_body import NOT_TEXT
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
        request_id = _request_id()
        logger.error("unhandled error (request %s)", request_id, exc_info=exc)
        exc = ShardserveError(f"internal server error (request id {request_id})", code="internal_error")
    elif exc.status_code == 500:  # the id to quote in a report: it is in the server's logs (and x-request-id)
        exc = type(exc)(f"{exc.message} (request id {_request_id()})", exc.param, exc.code, exc.retry_after_s)
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    path = request.url.path.removeprefix(request.scope.get("root_path", ""))  # the app may sit under a route prefix
    body: dict[str, Any] = {"error": exc.message} if is_tf_route(path) else exc.to_openai()
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


def _request_id() -> str:
    """Serve's id of the request being answered (its logs and the x-request-id header carry it)."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or uuid.uuid4().hex


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
        if exc.status_code == 400:  # FastAPI could not decode the body (invalid UTF-8 among others)
            return error_response(request, InvalidRequest(NOT_TEXT))
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
      front (the server reads no more than it announces), a chunked body is read here up to
      the limit and refused as soon as it passes it.
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
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            # Chunked: read it here, bounded, so that an oversized one is a 413 too.
            body = await self._read_bounded(receive)
            if body is None:
                await self._reject(scope, receive, send)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _read_bounded(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it passes the limit (the rest is never read)."""
        parts: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(parts)
            parts.append(message.get("body", b""))
            seen += len(parts[-1])
            if seen > self.max_bytes:
                return None
            if not message.get("more_body", False):
                return b"".join(parts)

    def _error(self) -> RequestTooLarge:
        return RequestTooLarge(f"request body is larger than {self.max_bytes} bytes", code="request_too_large")

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(Request(scope, receive), self._error())
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the already-read body, then waits on the real channel
    (which reports the client's disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
