"""Whether a model deployment has ever served: a cluster-wide flag its replica sets once its
model is loaded, which the ingress reads (deployments/ingress/assignment.py) to tell a rolling
update's gap from a first load. Shared by both processes, so it lives with neither."""

from __future__ import annotations

_SERVED_NAMESPACE = "shardserve"


def record_served(app: str, deployment: str) -> None:
    """Called by a model replica once its model is loaded: this deployment has served. Kept in
    the cluster's GCS key-value store, because a redeploy replaces every replica of the app,
    the ingress included: a new ingress must still tell a rolling update's gap (old replica
    stopped, new one loading: wait, as Serve has requests do) from a first load (answer 503).
    Ray has no public key-value API; `ray.experimental.internal_kv` is what Ray's own libraries
    use for such cluster-wide flags. A deployment deleted and created again under the same name
    counts as having served: its first load then waits, as before this check existed."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(_served_key(app, deployment), b"1", namespace=_SERVED_NAMESPACE)


def has_served(app: str, deployment: str) -> bool:
    from ray.experimental.internal_kv import _internal_kv_exists

    return bool(_internal_kv_exists(_served_key(app, deployment), namespace=_SERVED_NAMESPACE))


def _served_key(app: str, deployment: str) -> str:
    return f"served:{app}:{deployment}"
