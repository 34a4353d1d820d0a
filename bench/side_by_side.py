"""vLLM's CPU backend and shardserve measured in alternating blocks, each with the machine to
itself.

On this project's shared 2-core VM the machine's speed drifts by 20-30% within minutes. Measured
once each, one after the other, the two systems get different machines, and a ratio from one run
says more about the drift than about the systems: on 2026-12-04 two runs of the same code fifteen
minutes apart gave shardserve/vLLM at c=8 1.15x and 0.58x. Here each system runs every level
in a block, and the blocks go A B, then B A (two rounds: ABBA), so that a steady drift falls on
both alike. Each round has prompts of its own (with prefix caching on in both, a round that
repeated the last one's prompts would measure cache hits, not prefills), the same for both.

A system with `stop` is stopped before the other's block: an idle shardserve (Ray's GCS, raylet
and Serve controller, the replicas' metrics) takes 0.2 of the 2 cores, which would be taken
from vLLM. vLLM stays up (a restart costs its 2-minute start), and what it takes while idle
(0.02-0.03 cores) is recorded beside the results.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from bench import workload


@dataclass
class Contender:
    """A system in the alternation. `start` brings it up and returns (base URL, served model
    name); `stop`, when given, takes it down before the other system's block. One without
    `stop` stays up, and `cpu_seconds` tells what it takes while idle."""

    start: Callable[[], tuple[str, str]]
    stop: Callable[[], None] | None = None
    cpu_seconds: Callable[[], float] | None = None
    """CPU time so far of every process of this system (user + system, children included)."""
    fresh_connections: bool = False
    """A new connection per request (a server that ends streams by closing them)."""


def tree_cpu_seconds(roots: Callable[[], list[psutil.Process]]) -> Callable[[], float]:
    """A counter over the processes `roots()` names and all their descendants, looked up anew
    at each call (replicas and engine processes come and go)."""

    def total() -> float:
        seconds = 0.0
        for root in roots():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for proc in procs:
                try:
                    times = proc.cpu_times()
                except psutil.NoSuchProcess:
                    continue
                seconds += times.user + times.system
        return seconds

    return total


def turn_order(systems: list[str], round_index: int) -> list[str]:
    """The systems in the order round `round_index` measures them: reversed every other round."""
    return list(systems) if round_index % 2 == 0 else list(reversed(systems))


def measure(
    contenders: dict[str, Contender],
    loads: dict[int, list[list[workload.BenchRequest]]],
    prefix_loads: list[list[workload.BenchRequest]],
    warmup: list[workload.BenchRequest],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Every level, then the shared-prefix load, for each contender in its block; one round per
    workload in the lists (all of the same length), blocks in `turn_order`.

    Returns `levels` (per level, per system: the summary over all its rounds, wall times
    summed), `rounds` (per level, each round's output tok/s per system), `prefix` (each
    system's shared-prefix TTFT over its rounds) and `idle_cores` (per system, the mean cores
    its processes took while the other was measured and it was up). A contender still up at
    the end is left up (the caller stops it)."""
    names = list(contenders)
    rounds = len(prefix_loads)
    work = [(str(c), per_round, c) for c, per_round in loads.items()] + [("prefix", prefix_loads, 1)]
    gathered = {key: {n: ([], 0.0) for n in names} for key, _, _ in work}
    per_round: dict[str, list[dict[str, float]]] = {key: [{} for _ in range(rounds)] for key, _, _ in work}
    idle_seconds = dict.fromkeys(names, 0.0)
    idle_wall = dict.fromkeys(names, 0.0)
    up: dict[str, tuple[str, str]] = {}
    for r in range(rounds):
        for name in turn_order(names, r):
            for other in [o for o in up if o != name and contenders[o].stop is not None]:
                log(f"stopping {other} for {name}'s block")
                contenders[other].stop()  # type: ignore[misc]
                del up[other]
            if name not in up:
                up[name] = contenders[name].start()
                fresh = contenders[name].fresh_connections
                asyncio.run(workload.run_load(*up[name], warmup, 2, stream=True, fresh_connections=fresh))  # never measured
            url, model_name = up[name]
            for key, per, concurrency in work:
                idle = {o: counter for o in up if o != name and (counter := contenders[o].cpu_seconds) is not None}
                idle_before = {o: counter() for o, counter in idle.items()}
                what = f"{name} {key} round {r + 1}/{rounds}"
                fresh = contenders[name].fresh_connections
                load = workload.run_load(
                    url, model_name, per[r], concurrency, True, progress=what, ignore_eos=True, fresh_connections=fresh
                )
                results, wall = asyncio.run(load)
                workload.check_same_work(name, per[r], results)
                for other, before in idle_before.items():
                    idle_seconds[other] += idle[other]() - before
                    idle_wall[other] += wall
                done, total = gathered[key][name]
                gathered[key][name] = (done + results, total + wall)
                per_round[key][r][name] = workload.summarize(results, wall)["output_tokens_per_s"]
    levels = {key: {n: workload.summarize(*gathered[key][n]) for n in names} for key, _, _ in work}
    prefix = levels.pop("prefix")
    del per_round["prefix"]
    return {
        "levels": levels,
        "rounds": per_round,
        "prefix": prefix,
        "idle_cores": {n: idle_seconds[n] / idle_wall[n] for n in names if idle_wall[n] > 0},
    }
