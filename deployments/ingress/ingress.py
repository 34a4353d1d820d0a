"""The ingress deployment: HTTP routes and the Python handle API, in front of the LLM server.

`serve.get_app_handle(app_name)` returns a handle to this deployment, so its public methods
(`generate`, `generate_stream`, `model_card`, `tokenize`, `detokenize`) are the documented Python API. The HTTP routes
call the same methods, so both paths behave the same.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.handle import DeploymentHandle

from deployments.api import openai_routes, responses_routes, tfserving_routes
from deployments.api.auth import ApiKeyAuth, load_keys
from deployments.api.http_errors import HttpMetrics, RequestGuard, install_error_handlers, unwrap
from deployments.api.json_body import TextJSONRoute
from deployments.config import ShardserveArgs
from deployments.errors import ModelNotFound, Overloaded, ShardserveError
from deployments.ingress.assignment import AppDeployments, PlacedCalls, cancelled_unless_finished, serve_refusals_as_503
from deployments.ingress.model_cards import ModelCards
from deployments.ingress.result_cache import ResultCache, replay
from deployments.limits import check_request
from deployments.metrics import IngressMetrics, MetricsPusher, replica_identity, snapshot
from deployments.streams import StreamRecorder
from deployments.types import (
    EmbedRequest,
    EmbedResponse,
    GenerateChunk,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    TokenizeRequest,
    TokenizeResponse,
)

logger = logging.getLogger("ray.serve")

@serve.ingress()
class Ingress:
    def __init__(
        self,
        llm_servers: DeploymentHandle | dict[int, DeploymentHandle],
        args: ShardserveArgs,
        metrics_hub: DeploymentHandle | None = None,
    ) -> None:
        # One LLM server deployment per served version; a plain config serves one version.
        self._llms = llm_servers if isinstance(llm_servers, dict) else {args.model_version: llm_servers}
        self.versions = sorted(self._llms)
        self.labels = dict(args.repository.labels) if args.repository else {}
        self._traffic = dict(args.repository.traffic) if args.repository and args.repository.traffic else None
        self._args = args
        self.model_name = args.model_name
        self.max_prompts = args.limits.max_prompts
        self._metrics = IngressMetrics(args.model_name)
        self._caches = {v: ResultCache(args.cache, args.model_name, v, self._metrics) for v in self.versions}
        self._hub = metrics_hub
        self._app_deployments = AppDeployments()
        self._cards = ModelCards(self._llms, self._app_deployments)
        self._placed = PlacedCalls(args.engine.replica_capacity, args.engine.router_queue_size)
        self._pusher = (
            MetricsPusher(metrics_hub, *replica_identity(), self._metrics.registry, lambda: None) if metrics_hub else None
        )

    def _started(self) -> None:
        if self._pusher is not None:
            self._pusher.ensure_started()

    def resolve_version(self, version: int | str | None = None, label: str | None = None) -> int:
        """The served version a request names (by number or label); the newest when it names
        none. ModelNotFound (404) otherwise."""
        if label is not None:
            if label not in self.labels:
                raise ModelNotFound(f"Unrecognized servable version label: {label}")
            return self.labels[label]
        if version is None:
            if self._traffic is not None:  # canary split
                return random.choices(list(self._traffic), weights=list(self._traffic.values()))[0]
            return self.versions[-1]
        if str(version).isdigit() and int(version) in self._llms:
            return int(version)
        raise ModelNotFound(f"Servable not found for request: Specific({self.model_name}, {version})")

    # ---- Python API -------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest, version: int | None = None) -> GenerateResponse:
        """The whole answer; from the result cache when the request is reproducible and seen.
        `version`: a served version (None: the newest)."""
        self._started()
        v = self.resolve_version(version)
        check_request(request, self._args.limits)
        cache = self._caches[v]
        key, fingerprint = await self._cache_key(v, request)
        if key is not None and (hit := await cache.lookup(key)) is not None:
            return hit
        for attempt in range(self._args.faults.retries_on_replica_failure + 1):
            try:
                with serve_refusals_as_503():
                    served, pending = await self._send(v, version is not None, request, stream=False)
                    with self._placed.held():
                        response = await pending
                break
            except Overloaded as exc:
                if not await self._retry_after_replica_failure(exc, attempt):
                    raise
        if key is not None and served == v and self._same_checkpoint(v, fingerprint, response.model_fingerprint):
            await cache.store(key, response)
        return response

    async def generate_stream(self, request: GenerateRequest, version: int | None = None) -> AsyncIterator[GenerateChunk]:
        """Chunks as they are generated; a cached answer is replayed as one chunk per output."""
        self._started()
        v = self.resolve_version(version)
        check_request(request, self._args.limits)
        cache = self._caches[v]
        key, fingerprint = await self._cache_key(v, request)
        if key is not None and (hit := await cache.lookup(key)) is not None:
            for chunk in replay(hit):
                yield chunk
            return
        recorder = StreamRecorder(request.n) if key is not None else None
        started = False
        for attempt in range(self._args.faults.retries_on_replica_failure + 1):
            try:
                with serve_refusals_as_503():
                    served, stream = await self._send(v, version is not None, request, stream=True)
                    with self._placed.held(), cancelled_unless_finished(stream):
                        async for chunk in stream:
                            started = True
                            if recorder is not None:
                                recorder.add(chunk)
                            yield chunk
                break
            except Overloaded as exc:
                if started or not await self._retry_after_replica_failure(exc, attempt):
                    raise
        if key is not None and recorder is not None and served == v:
            response = recorder.response(self.model_name, with_logprobs=request.logprobs is not None)
            if response is not None and self._same_checkpoint(v, fingerprint, response.model_fingerprint):
                await cache.store(key, response)

    async def _cache_key(self, v: int, request: GenerateRequest) -> tuple[str | None, str]:
        """The result-cache key of a request to version v, and the checkpoint fingerprint it
        was made with. It keys on what the engine will run: the model's sampling defaults
        filled in where the request left fields out (the request itself is sent as it is; the
        replica applies its own defaults)."""
        if not (self._args.cache.enabled and request.cache):
            return None, ""
        card = await self.model_card(v)
        filled = request.with_defaults(card.sampling_defaults)
        return self._caches[v].key(filled, fingerprint=card.fingerprint), card.fingerprint

    def _same_checkpoint(self, v: int, keyed_with: str, answered_by: str | None) -> bool:
        """Store an answer only under its own checkpoint's key. A replica serving another
        checkpoint than the card this ingress holds (a rollout to new weights under the same
        name and version) means the card is stale: it is read again on the next request."""
        if answered_by == keyed_with:
            return True
        self._cards.forget(v)
        return False

    async def _send(self, v: int, pinned: bool, request: GenerateRequest, stream: bool) -> tuple[int, Any]:
        """Send the request to version v's deployment once Serve assigns it a replica; returns
        the version that took it and the (streaming) response. A request that named no version
        and waited for one that a redeploy stopped serving, or that is still loading (a canary
        just added), goes to the newest version instead; one that named it gets a 503 (a retry
        reaches the new config, or the loaded model)."""
        targets = list(dict.fromkeys([v] if pinned else [v, self.versions[-1]]))
        for i, target in enumerate(targets):
            handle = self._llms[target]
            call = handle.options(stream=True).generate_stream if stream else handle.generate
            try:
                placed, response = await self._placed.place(call.remote, request, handle.deployment_name, self._app_deployments)
            except Overloaded as exc:
                if exc.code not in ("model_loading", "model_load_failed") or i == len(targets) - 1:
                    raise
                logger.warning("model version %d cannot serve yet (%s); sending to version %d", target, exc.message, targets[-1])
                continue
            if placed:
                return target, response
            logger.warning("model version %d left the app while this request waited for it", target)  # Serve adds the id
        raise Overloaded(
            f"model version {v} stopped being served while the request waited", code="unavailable", retry_after_s=1.0
        )

    async def _retry_after_replica_failure(self, exc: Overloaded, attempt: int) -> bool:
        """Whether to send the request again: only when its replica failed before producing
        anything and retries are left. A failed replica's refusal (nothing of the request ran)
        is retried up to `retries_on_replica_failure` times; a replica process that died under
        the request only once, since the request may be what killed it. The backoff (0.2 s,
        0.4 s, ...) gives Serve time to route around the failed replica."""
        retries = self._args.faults.retries_on_replica_failure
        if getattr(unwrap(exc), "code", None) != "replica_failed" or attempt >= retries:
            return False
        if isinstance(exc.__cause__, (ActorDiedError, ActorUnavailableError)) and attempt >= 1:
            return False
        logger.warning("model replica failed before answering; retry %d of %d", attempt + 1, retries)
        await asyncio.sleep(0.2 * 2**attempt)
        return True

    async def model_card(self, version: int | None = None) -> ModelCard:
        """The card of a served version (None: the newest, whatever the canary split)."""
        return await self._cards.get(self._served(version))

    async def tokenize(self, request: TokenizeRequest, version: int | None = None) -> TokenizeResponse:
        """Token ids of a prompt or chat turns as the served version (None: the newest) reads them."""
        return await self._llms[self._served(version)].tokenize.remote(request)

    async def detokenize(self, tokens: list[int], version: int | None = None) -> str:
        return await self._llms[self._served(version)].detokenize.remote(tokens)

    async def embed(self, request: EmbedRequest, version: int | None = None) -> EmbedResponse:
        return await self._llms[self._served(version)].embed.remote(request)

    def _served(self, version: int | None) -> int:
        """The version a call names; None: the newest (whatever the canary split)."""
        return self.versions[-1] if version is None else self.resolve_version(version)

    async def metrics(self) -> str:
        """Prometheus text for every replica of the app (this one's counters as of now)."""
        if self._hub is None or self._pusher is None:
            return generate_latest(self._metrics.registry).decode()
        source, deployment = replica_identity()
        return await self._hub.render.remote(source, deployment, snapshot(self._metrics.registry))

    # ---- HTTP -------------------------------------------------------------------------------

    # Serve's documented hook for `@serve.ingress()` with no app: the routes depend on the
    # config, known only once the replica is constructed (tests/test_ray_reach_ins.py).
    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(title="shardserve", version="0.1.0")
        app.router.route_class = TextJSONRoute
        install_error_handlers(app)

        @app.get("/health")
        async def health() -> dict[str, str]:
            """Liveness: the ingress answers. Reveals nothing about the configuration."""
            return {"status": "ok"}

        @app.get("/ready")
        async def ready() -> Any:
            """Readiness: a model replica is loaded and answers; 503 with the reason otherwise
            (loading, or the load's error), at once."""
            try:
                card = await self.model_card()
            except Exception as exc:  # noqa: BLE001 - not ready, whatever the reason
                reason = unwrap(exc)
                detail = reason.message if isinstance(reason, ShardserveError) else type(reason).__name__
                return JSONResponse({"status": "not ready", "reason": detail}, status_code=503)
            return {"status": "ready", "model": card.name}

        @app.get("/metrics")
        async def metrics() -> Response:
            """Prometheus text format, covering every replica of the app."""
            return Response(await self.metrics(), media_type=CONTENT_TYPE_LATEST)

        openai_routes.register(app, self)
        responses_routes.register(app, self)
        tfserving_routes.register(app, self)
        app.add_middleware(RequestGuard, max_bytes=self._args.limits.max_request_body_bytes)
        if self._args.auth.enabled:
            app.add_middleware(ApiKeyAuth, keys=load_keys(self._args.auth))
        app.add_middleware(HttpMetrics, record=self._metrics.http_request)
        return app
