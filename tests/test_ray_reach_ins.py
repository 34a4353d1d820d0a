"""The places where shardserve uses Ray Serve's internals, each because no public hook serves
(the reason is at the use). If a Ray upgrade moves one, this fails naming it, instead of the
feature failing later in a way that takes a day to trace. No cluster: attributes only."""

from __future__ import annotations

import inspect

import pytest

RAY = "Ray moved a private name shardserve relies on"


def test_the_request_router_names_come_from_the_public_module() -> None:
    import deployments.routing as routing

    source = inspect.getsource(routing)
    assert "ray.serve._private" not in source, "deployments/routing.py: import from ray.serve.request_router"


def test_one_apps_status_from_the_controller_client() -> None:
    """deployments/ingress/assignment.py: a deployment's status and message for the 503 bodies."""
    from ray.serve import context

    assert callable(getattr(context, "_get_global_client", None)), f"{RAY}: ray.serve.context._get_global_client"
    from ray.serve._private.client import ServeControllerClient

    assert "name" in inspect.signature(ServeControllerClient.get_serve_status).parameters, (
        f"{RAY}: ServeControllerClient.get_serve_status(name)"
    )


def test_the_cluster_wide_served_flag() -> None:
    """deployments/served_flag.py: record_served / has_served (Ray has no public key-value API)."""
    from ray.experimental import internal_kv

    for name in ("_internal_kv_put", "_internal_kv_exists"):
        fn = getattr(internal_kv, name, None)
        assert fn is not None and "namespace" in inspect.signature(fn).parameters, f"{RAY}: internal_kv.{name}(namespace=)"


@pytest.mark.parametrize("response", ["DeploymentResponse", "DeploymentResponseGenerator"])
def test_the_step_that_resolves_when_a_call_is_assigned(response: str) -> None:
    """deployments/ingress/assignment.py: `assigned` watches it to answer 503 while no replica can serve
    (without it the call would wait as Serve decides: the check degrades, it does not break)."""
    from ray.serve import handle

    fetch = getattr(getattr(handle, response), "_fetch_future_result_async", None)
    assert inspect.iscoroutinefunction(fetch), f"{RAY}: {response}._fetch_future_result_async"


def test_the_ingress_builds_its_app_at_replica_start() -> None:
    """deployments/ingress/ingress.py: `@serve.ingress()` with no app calls __serve_build_asgi_app__."""
    from ray.serve import api

    assert "__serve_build_asgi_app__" in inspect.getsource(api.ingress), f"{RAY}: serve.ingress() no longer defers the app"
