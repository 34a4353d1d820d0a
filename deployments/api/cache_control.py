"""How HTTP clients steer the result cache: the `cache` body field and Cache-Control."""

from __future__ import annotations

from fastapi import Request, Response

from deployments.types import GenerateRequest, GenerateResponse

CACHE_STATUS_HEADER = "x-shardserve-cache"


def with_cache_control(requests: list[GenerateRequest], raw: Request) -> list[GenerateRequest]:
    """`Cache-Control: no-cache` or `no-store` turns the result cache off for these requests,
    as the `cache: false` body field does."""
    directives = {d.strip().lower() for d in raw.headers.get("cache-control", "").split(",")}
    if directives & {"no-cache", "no-store"}:
        return [r.model_copy(update={"cache": False}) for r in requests]
    return requests


def mark_cache_status(response: Response, answers: list[GenerateResponse]) -> None:
    """`x-shardserve-cache: hit` when every answer came from the cache, else `miss`."""
    response.headers[CACHE_STATUS_HEADER] = "hit" if answers and all(a.cached for a in answers) else "miss"
