"""Seeded workloads and an OpenAI-completions load generator that records per-request timings."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    prompt_tokens: int
    max_tokens: int


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float
    e2e_s: float
    output_tokens: int
    chunk_gaps_s: list[float] = field(default_factory=list)
    """Between consecutive streamed chunks that carried text: how smooth the stream was (a
    server that batches its chunks sends fewer, further apart)."""


def mixed_workload(tokenizer, count: int, seed: int, prompt_range=(64, 512), output_range=(32, 256)) -> list[BenchRequest]:
    """Prompts of random (but valid) tokens; lengths drawn uniformly from the ranges."""
    rng = random.Random(seed)
    vocab = [i for i in range(len(tokenizer)) if i not in set(tokenizer.all_special_ids)]
    out = []
    for _ in range(count):
        length = rng.randint(*prompt_range)
        out.append(_make(tokenizer, [rng.choice(vocab) for _ in range(length)], rng.randint(*output_range)))
    return out


def shared_prefix_workload(
    tokenizer, count: int, seed: int, prefix_tokens: int = 512, max_tokens: int = 16
) -> list[BenchRequest]:
    """One long system prompt, then a short varied question: what prefix caching is for."""
    rng = random.Random(seed)
    vocab = [i for i in range(len(tokenizer)) if i not in set(tokenizer.all_special_ids)]
    system = tokenizer.decode([rng.choice(vocab) for _ in range(prefix_tokens)])
    out = []
    for i in range(count):
        question = f" Question {i}: " + tokenizer.decode([rng.choice(vocab) for _ in range(rng.randint(16, 48))])
        text = system + question
        out.append(BenchRequest(text, len(tokenizer.encode(text)), max_tokens))
    return out


def _make(tokenizer, ids: list[int], max_tokens: int) -> BenchRequest:
    text = tokenizer.decode(ids)
    return BenchRequest(text, len(tokenizer.encode(text)), max_tokens)


async def run_load(
    base_url: str,
    model: str,
    requests: list[BenchRequest],
    concurrency: int,
    stream: bool,
    extra: dict | None = None,
    progress: str = "",
    ignore_eos: bool = False,
    fresh_connections: bool = False,
) -> tuple[list[RequestResult], float]:
    """Send every request with at most `concurrency` in flight; returns results and wall time.
    With `ignore_eos` every request generates exactly its max_tokens (vLLM's and llama.cpp's
    field, and ours): systems compared on throughput do the same work even where their greedy
    tokens part (`check_same_work` then holds them to it). `fresh_connections`: one connection
    per request, for a server that ends a stream by closing it (llama.cpp's)."""
    sem = asyncio.Semaphore(concurrency)
    done = 0
    keep = 0 if fresh_connections else concurrency + 4
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=keep)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:

        async def one(req: BenchRequest) -> RequestResult:
            nonlocal done
            async with sem:
                body = {
                    "model": model,
                    "prompt": req.prompt,
                    "max_tokens": req.max_tokens,
                    "temperature": 0,
                    **({"ignore_eos": True} if ignore_eos else {}),
                    **(extra or {}),
                }
                result = await (streamed(client, body) if stream else _whole(client, body))
            done += 1
            if progress and (done % max(1, len(requests) // 10) == 0 or done == len(requests)):
                print(f"  {progress}: {done}/{len(requests)} requests", flush=True)
            return result

        start = time.perf_counter()
        results = await asyncio.gather(*(one(r) for r in requests))
        return list(results), time.perf_counter() - start


async def _whole(client: httpx.AsyncClient, body: dict) -> RequestResult:
    start = time.perf_counter()
    res = await client.post("/v1/completions", json=body)
    elapsed = time.perf_counter() - start
    if res.status_code != 200:
        return RequestResult(False, elapsed, elapsed, 0)
    return RequestResult(True, elapsed, elapsed, res.json()["usage"]["completion_tokens"])


async def streamed(client: httpx.AsyncClient, body: dict) -> RequestResult:
    """One streamed completion (`body` as the OpenAI route takes it), timed."""
    start = time.perf_counter()
    first: float | None = None
    last_text: float | None = None
    gaps: list[float] = []
    tokens = 0
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as res:
        if res.status_code != 200:
            await res.aread()
            return RequestResult(False, 0.0, time.perf_counter() - start, 0)
        async for line in res.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            event = json.loads(line[6:])
            if any(choice.get("text") for choice in event.get("choices") or []):
                if last_text is not None:
                    gaps.append(now - last_text)
                last_text = now
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    end = time.perf_counter()
    return RequestResult(True, (first or end) - start, end - start, tokens, gaps)


def check_same_work(system: str, requests: list[BenchRequest], results: list[RequestResult]) -> None:
    """With ignore_eos every answer is exactly max_tokens long: a system that generated other
    counts did other work, and its throughput is not comparable."""
    got = [r.output_tokens for r in results if r.ok]
    asked = [q.max_tokens for q, r in zip(requests, results, strict=True) if r.ok]
    if got != asked:
        wrong = sum(g != a for g, a in zip(got, asked, strict=True))
        tokens = f"{sum(got)} tokens, {sum(asked)} asked"
        raise RuntimeError(f"{system}: {wrong} of {len(got)} answers were not max_tokens long ({tokens})")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize(results: list[RequestResult], wall_s: float) -> dict[str, float]:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1 and r.e2e_s > r.ttft_s]
    gaps = [g for r in ok for g in r.chunk_gaps_s]
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "output_tokens": tokens,
        "wall_s": wall_s,
        "output_tokens_per_s": tokens / wall_s,
        "requests_per_s": len(ok) / wall_s,
        "ttft_p50_s": percentile([r.ttft_s for r in ok], 50),
        "ttft_p99_s": percentile([r.ttft_s for r in ok], 99),
        "tpot_p50_s": percentile(tpot, 50) if tpot else float("nan"),
        "tpot_p99_s": percentile(tpot, 99) if tpot else float("nan"),
        "chunk_gap_p50_s": percentile(gaps, 50) if gaps else float("nan"),
        "chunk_gap_p99_s": percentile(gaps, 99) if gaps else float("nan"),
        "e2e_mean_s": statistics.fmean(r.e2e_s for r in ok) if ok else float("nan"),
    }


def as_json(obj: object) -> str:
    return json.dumps(obj, indent=2, default=lambda o: asdict(o))


@dataclass
class Outcome:
    started: float
    ended: float
    status: int  # 0: no HTTP answer (connection error)
    body: str


@dataclass
class ClosedLoop:
    """Clients in threads, each sending one non-streamed completion after another until stopped;
    every outcome is kept with its timing, so that a fault run can say which requests failed,
    when they had started and how they ended. A context manager (start on enter, stop on exit)."""

    base: str
    clients: int = 4
    body: dict[str, Any] = field(default_factory=lambda: {"max_tokens": 24, "temperature": 0, "ignore_eos": True})
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> ClosedLoop:
        for i in range(self.clients):
            self._threads.append(threading.Thread(target=self._client, args=(i,), daemon=True))
            self._threads[-1].start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200]

    def successes_after(self, t: float) -> int:
        return sum(1 for o in self.outcomes if o.status == 200 and o.started > t)

    def _client(self, i: int) -> None:
        body = {"prompt": f"Client {i} asks", **self.body}
        with httpx.Client(base_url=self.base, timeout=120) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    res = client.post("/v1/completions", json=body)
                    status, text = res.status_code, res.text
                except httpx.HTTPError as exc:
                    status, text = 0, repr(exc)
                self.outcomes.append(Outcome(started, time.monotonic(), status, text))
