"""JSON bodies whose strings are text: the route class every shardserve route uses.

Python's json module accepts invalid UTF-8 only by failing deep in FastAPI with a vague message,
and accepts `"\\ud800"` (a lone surrogate) as a valid string that later breaks the tokenizer, the
cache key and the log lines. Both are refused here, before a route runs, with a 400.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

# Only bodies that spell a surrogate escape at all pay for the full check.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")

NOT_TEXT = "request body is not valid UTF-8 JSON"


class TextJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                value = json.loads(body.decode("utf-8"))
                if _SURROGATE_ESCAPE.search(body):
                    json.dumps(value, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
            except UnicodeError:
                raise HTTPException(400, NOT_TEXT) from None
            self._json = value
        return self._json


class TextJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(TextJSONRequest(request.scope, request.receive))

        return strict_handler
