"""How HTTP clients steer the result cache: the `cache` body field and Cache-Control."""

from __future__ import annotations

from fastapi import Request, Response

from deployments.types import GenerateRequest, GenerateResponse

CACHE_STATUS_HEADER = "x-shardserve-cache"


def with_cache_control(requests: list[GenerateRequest], raw: Request) -> list[GenerateRequest]:
    """The caller's tenant (from its API key) on every request, and `Cache-Control: no-cache`
    or `no-store` turning the result cache off, as the `cache: false` body field does."""
    update: dict[str, object] = {}
    directives = {d.strip().lower() for d in raw.headers.get("cache-control", "").split(",")}
    if directives & {"no-cache", "no-store"}:
        update["cache"] = False
    tenant = raw.scope.get("state", {}).get("tenant")
    if tenant is not None:
        update["tenant"] = tenant
    return [r.model_copy(update=update) for r in requests] if update else requests


def mark_cache_status(response: Response, answers: list[GenerateResponse]) -> None:
    """`x-shardserve-cache: hit` when every answer came from the cache, else `miss`."""
    response.headers[CACHE_STATUS_HEADER] = "hit" if answers and all(a.cached for a in answers) else "miss"
