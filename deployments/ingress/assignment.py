"""Waiting for Serve to hand a call to a replica, but not for a deployment that is gone or
has no model to serve.

Serve keeps a handle call queued while its deployment has no running replica. That is right for
a replica being replaced or a scale-up, but not for a model that is still loading (minutes, for
a large checkpoint) or that failed to load: a client of `/v1/models` then hung until it gave up,
while the reason sat in the controller's log. And when a redeploy removes the deployment (a
model version the new config no longer serves), the calls already queued for it are not failed:
they wait until the calling replica, itself being drained, is killed at the end of its grace
period, and the client gets a 500 after that long. So the ingress waits for the assignment
itself: after half a second it asks the controller whether the deployment is still part of the
app and whether any replica of it runs, and answers 503 with the reason Serve shows in
`serve status` (loading, or the load's error) when none does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.context import _get_global_client
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from deployments.errors import Overloaded
from deployments.served_flag import has_served

# Statuses under which a deployment has replicas serving; under the others (UPDATING, UNHEALTHY,
# DEPLOY_FAILED) the replica count decides.
_SERVING = {"HEALTHY", "UPSCALING", "DOWNSCALING"}


class AppDeployments:
    """The deployments of this replica's application and their status, read from the controller
    at most once per `max_age_s` (`unhealthy_max_age_s` while one is not serving), and only by
    callers that are waiting anyway. It asks for this one application's status: `serve.status()`
    builds the details of every application and replica, which costs the controller and this
    process tens of milliseconds, and a queue of waiting requests under overload would pay it
    every second; it is read only to count the replicas of a deployment that is not serving."""

    def __init__(self, max_age_s: float = 2.0, unhealthy_max_age_s: float = 0.5) -> None:
        self._served: set[str] = set()
        self._max_age_s = max_age_s
        self._unhealthy_max_age_s = unhealthy_max_age_s
        self._statuses: dict[str, tuple[str, str]] = {}  # name -> (status, message)
        self._read_at = float("-inf")
        self._running: dict[str, int] = {}
        self._running_read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def contains(self, name: str) -> bool:
        await self._refresh()
        return name in self._statuses

    async def unavailable(self, name: str) -> Overloaded | None:
        """Why `name` cannot take a request now, as a 503 to answer with: no replica of it runs
        and none ever has (the model is loading), or its load fails. None while it serves, while
        a deployment that has served waits for a replacement or a rolling update's new replica
        (Serve stops the old replica before it starts the new one: those requests wait, as Serve
        has them do), or once it has left the app (which `contains` tells)."""
        await self._refresh()
        status, message = self._statuses.get(name, ("HEALTHY", ""))
        if status in _SERVING or await self._running_replicas(name) > 0:
            self._served.add(name)
            return None
        failing = status == "DEPLOY_FAILED" or bool(_last_error_line(message))
        if not failing and await self._has_served(name):
            return None
        return unavailable_error(status, message)

    def mark_served(self, name: str) -> None:
        """A call to `name` was assigned to a replica: it runs."""
        self._served.add(name)

    async def _has_served(self, name: str) -> bool:
        if name not in self._served and await asyncio.to_thread(has_served, serve.get_replica_context().app_name, name):
            self._served.add(name)
        return name in self._served

    async def _refresh(self) -> None:
        async with self._lock:
            healthy = all(status in _SERVING for status, _ in self._statuses.values())
            max_age = self._max_age_s if healthy else self._unhealthy_max_age_s
            if time.monotonic() - self._read_at > max_age:
                app = serve.get_replica_context().app_name
                # Private: serve.status() builds every app's full details on the controller; this runs
                # every few seconds on request paths and needs one app's statuses, which no public call gives.
                client = _get_global_client()
                status = await asyncio.to_thread(client.get_serve_status, app)
                self._statuses = {d.name: (str(d.status.value), d.message) for d in status.deployment_statuses}
                self._read_at = time.monotonic()

    async def _running_replicas(self, name: str) -> int:
        async with self._lock:
            if time.monotonic() - self._running_read_at > self._unhealthy_max_age_s:
                app = serve.get_replica_context().app_name
                details = (await asyncio.to_thread(serve.status)).applications.get(app)
                deployments = details.deployments if details is not None else {}
                self._running = {n: d.replica_states.get("RUNNING", 0) for n, d in deployments.items()}
                self._running_read_at = time.monotonic()
            return self._running.get(name, 0)


def unavailable_error(status: str, message: str) -> Overloaded:
    """The 503 for a model deployment without a running replica, its reason taken from what
    Serve shows in `serve status` (the last line of the load's error, when there is one)."""
    detail = _last_error_line(message)
    if status == "DEPLOY_FAILED":
        return Overloaded(f"the model failed to load: {detail or message}", code="model_load_failed", retry_after_s=30.0)
    if detail:
        return Overloaded(f"the model failed to load and is being retried: {detail}", code="model_loading", retry_after_s=5.0)
    return Overloaded("the model is loading; no replica can serve yet", code="model_loading", retry_after_s=5.0)


def _last_error_line(message: str) -> str:
    """`ModelLoadError: ...` of a message that ends with a traceback, without its module path."""
    if "Error" not in message and "Exception" not in message:
        return ""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    name, sep, text = last.partition(": ")
    return f"{name.rsplit('.', 1)[-1]}: {text}" if sep and " " not in name else last


async def assigned(
    response: Any, deployment: str, app: AppDeployments, first_check_s: float = 0.5, check_every_s: float = 2.0
) -> bool:
    """Wait until Serve gives `response`'s call (a DeploymentResponse or a streaming one) to a
    replica: True then; False, with the call cancelled, once `deployment` has left the app.
    A deployment with no replica running (the model loading, or failed to load) cancels the
    call and raises its 503; Serve's own queue-full refusal is raised as it is."""
    # Serve's private step behind every await of a response: it resolves when the call is
    # assigned and caches the result, so awaiting or iterating the response afterwards works.
    fetch = getattr(response, "_fetch_future_result_async", None)
    if fetch is None:  # another Serve version: no watch, the call waits as Serve decides
        return True
    assignment = asyncio.ensure_future(fetch())
    wait_s = first_check_s
    try:
        while True:
            done, _ = await asyncio.wait({assignment}, timeout=wait_s)
            wait_s = check_every_s
            if done:
                try:
                    assignment.result()
                except DeploymentUnavailableError:  # failed to deploy: say why
                    raise (await app.unavailable(deployment) or unavailable_error("DEPLOY_FAILED", "")) from None
                app.mark_served(deployment)
                return True
            if not await app.contains(deployment):
                response.cancel()
                return False
            if (refusal := await app.unavailable(deployment)) is not None:
                response.cancel()
                raise refusal
    except asyncio.CancelledError:  # the caller left (a client that disconnected)
        response.cancel()
        raise
    finally:
        if not assignment.done():
            assignment.cancel()


@contextmanager
def cancelled_unless_finished(response: Any) -> Iterator[None]:
    """Cancel the downstream call when the block using it ends early: a client that disconnects
    cancels the ingress's request, and Serve is meant to cancel the calls that request made too,
    but a streamed generation was once seen running on to max_tokens after its client had left
    (CI). Cancelling it here does not depend on that propagation; a finished call is left alone."""
    try:
        yield
    except BaseException:
        response.cancel()
        raise


class PlacedCalls:
    """The calls this ingress has placed on model replicas and not yet finished, to tell
    Serve's routing lag from overload. Serve's queue bound (`max_queued_requests`) counts every
    request still awaiting its routing decision, so a burst arriving at once (a router probing
    replica queue lengths) can be refused while the replica has room: seen, 20 streams against
    a replica that takes 32, one 503. The queue is kept short on purpose (a request held there
    waits batch times before the engine sees it), so a refusal that comes while a replica has
    more free places than Serve's queue can fill is sent again, for at most `window_s`, or
    `empty_window_s` while the replica is less than half full (a cold burst whose routing took
    longer than 50 ms on a contended CI machine: one of 24 refused; with 0.25 s, two of 24 once
    more in a whole CI run: a refusal while the replica is half empty is never overload, and
    resending it is better than a 503 whose Retry-After is a second). Under overload the replica
    is full and the refusal is returned at once: resending those too, as a place came free,
    made 1% of them take over 100 ms; so did a 0.2 s window whenever it had room (bench p99
    78 ms against 49-62)."""

    def __init__(
        self,
        replica_capacity: int,
        queue_size: int,
        window_s: float = 0.05,
        empty_window_s: float = 1.0,
        interval_s: float = 0.01,
    ) -> None:
        self.count = 0
        self._free_needed = replica_capacity - queue_size
        self._window_s = window_s
        self._empty_window_s = empty_window_s
        self._interval_s = interval_s

    async def place(self, send: Callable[[Any], Any], request: Any, deployment: str, app: AppDeployments) -> tuple[bool, Any]:
        """`send(request)` and wait for it as `assigned` does: (whether it was placed, the
        response). A queue-full refusal that is routing lag is sent again."""
        first_sent_at = time.monotonic()
        while True:
            response = send(request)
            try:
                return await assigned(response, deployment, app), response
            except BackPressureError:
                if not self._routing_lag(first_sent_at):
                    raise
                await asyncio.sleep(self._interval_s)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Around the use of a call Serve has assigned to a replica."""
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1

    def _routing_lag(self, first_sent_at: float) -> bool:
        if self.count >= self._free_needed:
            return False
        window_s = self._empty_window_s if 2 * self.count < self._free_needed else self._window_s
        return time.monotonic() - first_sent_at < window_s


@contextmanager
def serve_refusals_as_503() -> Iterator[None]:
    """Serve's own refusals (its queue in front of the replicas is full, or no replica is up),
    and a replica that died under the request, become our typed 503, with the same error body
    and Retry-After as the engine's: each is worth retrying."""
    try:
        yield
    except (ActorDiedError, ActorUnavailableError) as exc:
        raise Overloaded("the model replica serving this request failed", code="replica_failed", retry_after_s=1.0) from exc
    except BackPressureError as exc:
        raise Overloaded("server is overloaded: request queue is full", code="queue_full", retry_after_s=1.0) from exc
    except DeploymentUnavailableError as exc:
        raise Overloaded("no model replica is available", code="unavailable", retry_after_s=5.0) from exc
