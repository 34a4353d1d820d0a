"""API keys in front of every route: `Authorization: Bearer <key>`, keys known by their SHA-256
only, each mapped to a tenant with optional rate and concurrency limits.

An ASGI middleware, so it runs before any body is read or parsed: a request without a valid
key costs the server nothing but the hash. /health stays open (it says only "ok").
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from deployments.api.http_errors import error_response
from deployments.config import ApiKeyConfig, AuthConfig
from deployments.errors import RateLimited, Unauthorized

PUBLIC_PATHS = frozenset({"/health"})


def _route_path(scope: Scope) -> str:
    """The path the app routes on: under a route prefix, Serve passes it as root_path."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(config: AuthConfig) -> list[ApiKeyConfig]:
    """Inline keys, then the file's, then the environment variable's (all digests)."""
    keys = list(config.api_keys)
    if config.api_keys_file:
        keys += [ApiKeyConfig.model_validate(k) for k in json.loads(Path(config.api_keys_file).read_text())]
    if config.api_keys_env:
        raw = os.environ.get(config.api_keys_env)
        if raw is None:
            raise ValueError(f"auth.api_keys_env: environment variable {config.api_keys_env} is not set")
        keys += [ApiKeyConfig.model_validate(k) for k in json.loads(raw)]
    return keys


@dataclass
class KeyState:
    """Limits of one key: a token bucket for the rate, a counter for concurrency."""

    config: ApiKeyConfig
    tokens: float = 0.0
    refilled: float = field(default_factory=time.monotonic)
    in_flight: int = 0

    def __post_init__(self) -> None:
        self.tokens = float(self.config.burst)

    def admit(self) -> float | None:
        """None if the request may go; else seconds until it could."""
        c = self.config
        if c.max_concurrent is not None and self.in_flight >= c.max_concurrent:
            return 1.0
        if c.requests_per_s is not None:
            now = time.monotonic()
            self.tokens = min(c.burst, self.tokens + (now - self.refilled) * c.requests_per_s)
            self.refilled = now
            if self.tokens < 1:
                return (1 - self.tokens) / c.requests_per_s
            self.tokens -= 1
        return None


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, keys: list[ApiKeyConfig]) -> None:
        self.app = app
        self._keys = {k.sha256: KeyState(k) for k in keys}

    def _lookup(self, scope: Scope) -> KeyState | None:
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            return None
        digest = hash_key(key.strip())
        for known, state in self._keys.items():
            if hmac.compare_digest(known, digest):
                return state
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _route_path(scope) in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        state = self._lookup(scope)
        if state is None:
            error = Unauthorized("a valid API key is required: Authorization: Bearer <key>", code="invalid_api_key")
            await error_response(Request(scope, receive), error)(scope, receive, send)
            return
        wait = state.admit()
        if wait is not None:
            message = "the API key's rate or concurrency limit is reached"
            error = RateLimited(message, code="rate_limited", retry_after_s=max(wait, 1.0))
            await error_response(Request(scope, receive), error)(scope, receive, send)
            return
        scope.setdefault("state", {})["tenant"] = state.config.tenant
        state.in_flight += 1
        try:
            await self.app(scope, receive, send)  # a stream counts until its last byte
        finally:
            state.in_flight -= 1
