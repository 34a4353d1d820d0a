"""Chaos run: a tp=2 app on two replicas under steady load, something killed every 20 s (or
as soon as the app is back at full strength, when recovering takes longer).

    python -m bench.chaos           # 9 faults, about 4 minutes on 2 CPU cores
    python -m bench.chaos --quick   # 3 faults (one of each), about 2 minutes

Four closed-loop clients send short greedy completions the whole time. Each round kills one of
each, in a seeded random order: a model replica (SIGKILL to the replica process), one rank of a
replica's tensor-parallel group (SIGKILL to a random rank process), or the Serve controller
(`ray.kill`, which Ray restarts). After each fault the run measures how long until the app is
back at full strength (2 replicas, 4 live ranks, the victim gone, app RUNNING and a probe request
answered 200), which client requests failed and whether each failure was clean (an error status
with a JSON error body, no traceback), and that the placement groups held equal the replicas alive
(no group outlives its replica). At the end the app is deleted and no placement group or rank
may remain. Writes bench/results/chaos.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from bench.serving import RESULTS, free_port, log, publish
from bench.workload import ClosedLoop, Outcome, percentile

APP = "chaos"
KINDS = ("replica", "rank", "controller")


def live_actors(class_prefix: str) -> dict[str, int]:
    """actor id -> pid of the live actors whose class name starts with the prefix."""
    from ray._private import state as gcs_state

    return {
        actor_id: a["Pid"]
        for actor_id, a in gcs_state.actors().items()
        if a["State"] == "ALIVE" and a["ActorClassName"].startswith(class_prefix)
    }


def replicas() -> dict[str, int]:
    return live_actors(f"ServeReplica:{APP}:LLMServer")


def ranks() -> dict[str, int]:
    return live_actors("RankWorker")


def created_pgs() -> int:
    import ray

    return sum(1 for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED")


def controller_pid() -> int | None:
    import ray

    try:
        actor = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=5)
    except Exception:  # noqa: BLE001 - restarting: not there yet, or not answering yet
        return None


def app_running() -> bool:
    from ray import serve

    try:
        return serve.status().applications[APP].status == "RUNNING"
    except Exception:  # noqa: BLE001 - the controller is restarting
        return False


def probe(base: str) -> bool:
    try:
        body = {"prompt": "probe", "max_tokens": 2, "temperature": 0, "cache": False}
        return httpx.post(f"{base}/v1/completions", json=body, timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


def inject(kind: str, rng: random.Random) -> dict[str, Any]:
    """Kill one thing of the kind; what was killed, and what 'recovered' must see gone."""
    import ray

    if kind == "replica":
        victim, pid = rng.choice(sorted(replicas().items()))
        os.kill(pid, signal.SIGKILL)
        return {"victim_pid": pid, "gone_replica": victim}
    if kind == "rank":
        before = set(replicas())
        pid = rng.choice(sorted(ranks().values()))
        os.kill(pid, signal.SIGKILL)
        return {"victim_pid": pid, "replicas_before": before}
    pid = controller_pid()
    ray.kill(ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve"), no_restart=False)
    return {"victim_pid": pid}


def full_strength(kind: str, fault: dict[str, Any], base: str, world: int) -> bool:
    live = replicas()
    if len(live) != 2 or len(ranks()) != 2 * world or not app_running():
        return False
    if kind == "replica" and fault["gone_replica"] in live:
        return False
    if kind == "rank" and (fault["victim_pid"] in ranks().values() or set(live) == fault["replicas_before"]):
        return False  # the rank's whole group (its replica) must have been replaced
    if kind == "controller" and controller_pid() in (None, fault["victim_pid"]):
        return False
    return probe(base)


def wait(predicate, timeout_s: float, interval_s: float = 0.2) -> float | None:
    """Seconds until predicate() held, or None at the deadline."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval_s)
    return None


def clean(o: Outcome) -> bool:
    """An error a client can act on: an error status with a JSON error body, nothing internal."""
    try:
        error = json.loads(o.body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return o.status >= 400 and isinstance(error.get("message"), str) and "Traceback" not in o.body


def run(base: str, model: str, rounds: int, period_s: float, seed: int) -> dict[str, Any]:
    from ray import serve

    from deployments.app import bind_app
    from deployments.config import ShardserveArgs

    world = 2
    args = {
        "model": model,
        "served_model_name": "chaos",
        "tensor_parallel_size": world,
        "cache": {"enabled": False},
        "parallel": {"step_timeout_s": 5.0},
    }
    options = {"num_replicas": 2, "health_check_period_s": 2, "health_check_timeout_s": 10}
    serve.run(bind_app(ShardserveArgs.model_validate(args), options), name=APP, route_prefix=f"/{APP}")
    url = f"{base}/{APP}"
    if wait(lambda: len(replicas()) == 2 and len(ranks()) == 2 * world and probe(url), timeout_s=300) is None:
        raise TimeoutError("the tp=2 app did not come up")
    pgs_at_start = created_pgs()
    rng = random.Random(seed)
    with ClosedLoop(url, clients=4, body={"max_tokens": 16, "temperature": 0, "ignore_eos": True, "cache": False}) as load:
        events: list[dict[str, Any]] = []
        start = time.monotonic()
        time.sleep(period_s / 2)  # steady state first
        order = [kind for _ in range(rounds) for kind in rng.sample(KINDS, len(KINDS))]
        for n, kind in enumerate(order):
            fault_at = time.monotonic()
            fault = inject(kind, rng)
            log(f"  fault {n + 1}/{len(order)}: killed a {kind} (pid {fault['victim_pid']})")
            recovery = wait(lambda k=kind, f=fault: full_strength(k, f, url, world), timeout_s=180)
            settled = wait(lambda: created_pgs() == len(replicas()), timeout_s=30)
            event = {
                "kind": kind,
                "at_s": fault_at - start,
                "recovery_s": recovery,
                "placement_groups_match_replicas": settled is not None,
                "placement_groups": created_pgs(),
                "replicas": len(replicas()),
            }
            log(f"    back to full strength in {recovery if recovery is None else round(recovery, 1)} s")
            events.append(event)
            time.sleep(max(0.0, fault_at + period_s - time.monotonic()))
    outcomes = load.outcomes
    for i, event in enumerate(events):  # failures belong to the fault before them
        lo = start + event["at_s"]
        hi = start + events[i + 1]["at_s"] if i + 1 < len(events) else float("inf")
        failed = [o for o in outcomes if o.status != 200 and lo <= o.ended < hi]
        event["failed"] = len(failed)
        event["failed_unclean"] = [asdict(o) for o in failed if not clean(o)][:5]
        event["failed_statuses"] = sorted({o.status for o in failed})
        event["last_failure_after_s"] = max((o.ended - lo for o in failed), default=None)
    serve.delete(APP)
    cleared = wait(lambda: created_pgs() == pgs_at_start - 2 and not ranks(), timeout_s=60)
    before_first = [o for o in outcomes if o.status != 200 and (not events or o.ended < start + events[0]["at_s"])]
    return {
        "requests": len(outcomes),
        "failed": sum(1 for o in outcomes if o.status != 200),
        "failed_before_any_fault": len(before_first),
        "events": events,
        "placement_groups_at_start": pgs_at_start,
        "all_cleared_after_delete": cleared is not None,
        "wall_s": time.monotonic() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one fault of each kind, 10 s apart")
    parser.add_argument("--model", default="shardserve/tiny-llama")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "chaos.json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    rounds, period_s = (1, 10.0) if args.quick else (3, 20.0)
    report: dict[str, Any] = {
        "model": args.model,
        "quick": args.quick,
        "period_s": period_s,
        "seed": args.seed,
        "started": time.strftime("%Y-%m-%d %H:%M"),
    }
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        log(f"tp=2 app on 2 replicas, 4 clients, a fault every {period_s:.0f} s")
        report.update(run(f"http://127.0.0.1:{port}", args.model, rounds, period_s, args.seed))
    finally:
        serve.shutdown()
        ray.shutdown()
    publish(args.out, report, render(report))


def render(report: dict[str, Any]) -> str:
    lines = [
        f"Model `{report['model']}`, tensor_parallel_size 2, 2 replicas, 4 closed-loop clients (16-token greedy "
        f"completions), a fault every {report['period_s']:.0f} s (seed {report['seed']})"
        f"{' (quick run)' if report['quick'] else ''}, started {report['started']}: {report['requests']} requests, "
        f"{report['failed']} failed.",
        "",
        "| fault | recovery to full strength | failed requests (status) | unclean failures | last failure after | "
        "placement groups = replicas |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for e in report["events"]:
        recovery = "not within 180 s" if e["recovery_s"] is None else f"{e['recovery_s']:.1f} s"
        last = "-" if e["last_failure_after_s"] is None else f"{e['last_failure_after_s']:.1f} s"
        statuses = ", ".join(str(s) for s in e["failed_statuses"]) or "-"
        lines.append(
            f"| {e['kind']} | {recovery} | {e['failed']} ({statuses}) | {len(e['failed_unclean'])} | {last} | "
            f"{'yes' if e['placement_groups_match_replicas'] else 'NO'} ({e['placement_groups']}/{e['replicas']}) |"
        )
    lines.append("")
    for kind in KINDS:
        times = [e["recovery_s"] for e in report["events"] if e["kind"] == kind and e["recovery_s"] is not None]
        if times:
            lines.append(f"- {kind}: recovery p50 {percentile(times, 50):.1f} s, max {max(times):.1f} s over {len(times)}")
    cleared = "yes" if report["all_cleared_after_delete"] else "NO"
    lines += [f"- after the app was deleted, no placement group or rank left: {cleared}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
