"""The model card of each served version, as the ingress needs it on every request.

The result-cache key carries the card's fingerprint and sampling defaults, so a request must
not wait for a round trip to the model each time, nor send a burst of them: a burst of first
requests once filled Serve's short queue in front of the replica with card calls alone. So the
card is fetched once per version, with one fetch in flight, and then refreshed in the background
when it is older than `max_age_s` (the stale card keeps serving meanwhile), so that a replica
restarted on other weights at the same path is seen within seconds.
"""

from __future__ import annotations

import asyncio
import time

from ray.serve.handle import DeploymentHandle

from deployments.errors import Overloaded
from deployments.ingress.assignment import AppDeployments, assigned, serve_refusals_as_503
from deployments.types import ModelCard


class ModelCards:
    def __init__(self, handles: dict[int, DeploymentHandle], app: AppDeployments, max_age_s: float = 5.0) -> None:
        self._handles = handles
        self._app = app
        self._max_age_s = max_age_s
        self._cards: dict[int, tuple[float, ModelCard]] = {}
        self._fetches: dict[int, asyncio.Task[ModelCard]] = {}

    async def get(self, v: int) -> ModelCard:
        """Version v's card: the one held, or the first fetched (a 503 while no replica serves)."""
        held = self._cards.get(v)
        if held is not None:
            read_at, card = held
            if time.monotonic() - read_at > self._max_age_s:
                self._fetch(v)  # in the background; its failure leaves the held card in place
            return card
        return await asyncio.shield(self._fetch(v))

    def forget(self, v: int) -> None:
        """A replica answered with another fingerprint than the held card's: read it again."""
        self._cards.pop(v, None)

    def _fetch(self, v: int) -> asyncio.Task[ModelCard]:
        task = self._fetches.get(v)
        if task is None or task.done():
            task = self._fetches[v] = asyncio.ensure_future(self._read(v))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: never "never retrieved"
        return task

    async def _read(self, v: int) -> ModelCard:
        handle = self._handles[v]
        with serve_refusals_as_503():
            response = handle.model_card.remote()
            if not await assigned(response, handle.deployment_name, self._app):
                raise Overloaded(f"model version {v} stopped being served", code="unavailable", retry_after_s=1.0)
            card = await response
        self._cards[v] = (time.monotonic(), card)
        return card
