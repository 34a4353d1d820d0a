"""The ingress deployment: HTTP routes and the Python handle API, in front of the LLM server.

`serve.get_app_handle(app_name)` returns a handle to this deployment, so its public methods
(`generate`, `generate_stream`, `model_card`) are the documented Python API. The HTTP routes
call the same methods, so both paths behave the same.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from deployments.api import openai_routes, tfserving_routes
from deployments.api.http_errors import RequestGuard, install_error_handlers
from deployments.config import ShardserveArgs
from deployments.errors import Overloaded
from deployments.types import GenerateChunk, GenerateRequest, GenerateResponse, ModelCard


@serve.ingress()
class Ingress:
    def __init__(self, llm_server: DeploymentHandle, args: ShardserveArgs) -> None:
        self._llm = llm_server
        self._args = args
        self.model_name = args.model_name
        self.max_prompts = args.limits.max_prompts
        self._card: ModelCard | None = None

    # ---- Python API -------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        with _overload_as_503():
            return await self._llm.generate.remote(request)

    async def generate_stream(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        with _overload_as_503():
            async for chunk in self._llm.options(stream=True).generate_stream.remote(request):
                yield chunk

    async def model_card(self) -> ModelCard:
        if self._card is None:
            self._card = await self._llm.model_card.remote()
        return self._card

    # ---- HTTP -------------------------------------------------------------------------------

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(title="shardserve", version="0.1.0")
        install_error_handlers(app)

        @app.get("/health")
        async def health() -> dict[str, str]:
            """Liveness: the ingress answers. Reveals nothing about the configuration."""
            return {"status": "ok"}

        @app.get("/ready")
        async def ready() -> Any:
            """Readiness: a model replica is loaded and answers."""
            try:
                card = await self._llm.model_card.remote()
            except Exception:  # noqa: BLE001 - not ready, whatever the reason
                return JSONResponse({"status": "not ready"}, status_code=503)
            return {"status": "ready", "model": card.name}

        openai_routes.register(app, self)
        tfserving_routes.register(app, self)
        app.add_middleware(RequestGuard, max_bytes=self._args.limits.max_request_body_bytes)
        return app


@contextmanager
def _overload_as_503() -> Iterator[None]:
    """Serve's own refusals (its queue in front of the replicas is full, or no replica is up)
    become our typed 503, with the same error body and Retry-After as the engine's."""
    try:
        yield
    except BackPressureError as exc:
        raise Overloaded("server is overloaded: request queue is full", code="queue_full", retry_after_s=1.0) from exc
    except DeploymentUnavailableError as exc:
        raise Overloaded("no model replica is available", code="unavailable", retry_after_s=5.0) from exc
