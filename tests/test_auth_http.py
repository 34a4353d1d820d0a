"""API keys: every route but /health refuses a missing or wrong key with 401 in OpenAI's error
shape; keys map to tenants whose result-cache entries are apart; per-key rate and concurrency
limits answer 429 with Retry-After."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from deployments.api.auth import hash_key

from .conftest import TEST_ARGS

KEYS = {"alice": "sk-alice-secret", "bob": "sk-bob-secret", "slow": "sk-slow-secret", "single": "sk-single-secret"}


@pytest.fixture(scope="module")
def secured(server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    from deployments.app import build_app

    keys_file = tmp_path_factory.mktemp("secrets") / "keys.json"
    keys_file.write_text(json.dumps([{"sha256": hash_key(KEYS["single"]), "tenant": "single", "max_concurrent": 1}]))
    auth = {
        "api_keys": [
            {"sha256": hash_key(KEYS["alice"]), "tenant": "alice"},
            {"sha256": hash_key(KEYS["bob"]), "tenant": "bob"},
            {"sha256": hash_key(KEYS["slow"]), "tenant": "slow", "requests_per_s": 0.2, "burst": 2},
        ],
        "api_keys_file": str(keys_file),
    }
    serve.run(build_app({**TEST_ARGS, "auth": auth}), name="secured", route_prefix="/secured")
    yield f"{server}/secured"
    serve.delete("secured")


def bearer(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


def test_every_route_but_health_needs_a_key(secured: str) -> None:
    with httpx.Client(base_url=secured, timeout=60) as http:
        assert http.get("/health").json() == {"status": "ok"}
        schema = http.get("/openapi.json", headers=bearer("alice")).json()  # the app's own route list
        routes = [(m.upper(), p) for p, ops in schema["paths"].items() for m in ops]
        routes += [("GET", "/openapi.json"), ("GET", "/docs")]
        assert len(routes) > 10
        for method, path in routes:
            if path == "/health":
                continue
            concrete = path.replace("{name}", "tiny-llama").replace("{version}", "1").replace("{label}", "stable")
            for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": KEYS["alice"]}):
                res = http.request(method, concrete, headers=headers, json={})
                assert res.status_code == 401, (method, path, headers, res.status_code)
                body = res.json()
                error = body["error"] if isinstance(body["error"], dict) else {"message": body["error"]}
                assert "API key" in error["message"]
            authed = http.request(method, concrete, headers=bearer("alice"), json={})
            assert authed.status_code != 401, (path, authed.text)


def test_tenants_do_not_share_result_cache_entries(secured: str) -> None:
    body = {"prompt": "Tenant cache test", "max_tokens": 4, "temperature": 0}
    with httpx.Client(base_url=secured, timeout=60) as http:
        statuses = [
            http.post("/v1/completions", json=body, headers=bearer(who)).headers["x-shardserve-cache"]
            for who in ("alice", "alice", "bob", "bob")
        ]
    assert statuses == ["miss", "hit", "miss", "hit"]


def test_rate_limit_answers_429_with_retry_after(secured: str) -> None:
    body = {"prompt": "Rate", "max_tokens": 1, "cache": False}
    with httpx.Client(base_url=secured, timeout=60) as http:
        codes = [http.post("/v1/completions", json=body, headers=bearer("slow")) for _ in range(3)]
        assert [r.status_code for r in codes] == [200, 200, 429]
        refused = codes[2]
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert http.post("/v1/completions", json=body, headers=bearer("alice")).status_code == 200  # others unaffected


def test_concurrency_limit_counts_a_stream_until_it_ends(secured: str) -> None:
    body = {"prompt": "Long", "max_tokens": 400, "ignore_eos": True, "stream": True, "cache": False}
    with httpx.Client(base_url=secured, timeout=60) as http, http.stream(
        "POST", "/v1/completions", json=body, headers=bearer("single")
    ) as first:
        assert first.status_code == 200
        lines = first.iter_lines()
        next(lines)  # the stream is running
        second = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=bearer("single"))
        assert second.status_code == 429
        for _ in lines:
            pass
    with httpx.Client(base_url=secured, timeout=60) as http:
        assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=bearer("single")).status_code == 200


def test_tenants_do_not_share_kv(secured: str) -> None:
    """The same long prompt from two tenants: the second tenant reuses nothing of the first's
    KV, from the replica's pool, its host tier or the node store (salted block keys), and gets
    the same tokens."""
    from ray import serve

    handle = serve.get_deployment_handle("LLMServer", app_name="secured")

    def reused() -> float:
        stats = handle.engine_stats.remote().result(timeout_s=10)
        return stats.prefix_cache_hits + stats.host_cache_hit_tokens + stats.kv_tier_hit_tokens

    body = {"prompt": [10 + (7 * i) % 480 for i in range(300)], "max_tokens": 8, "temperature": 0, "cache": False}
    with httpx.Client(base_url=secured, timeout=60) as http:
        texts = [http.post("/v1/completions", json=body, headers=bearer("alice")).json()["choices"][0]["text"]]
        before = reused()
        texts.append(http.post("/v1/completions", json=body, headers=bearer("alice")).json()["choices"][0]["text"])
        assert reused() > before  # the same tenant reuses its prefix
        before = reused()
        texts.append(http.post("/v1/completions", json=body, headers=bearer("bob")).json()["choices"][0]["text"])
        assert reused() == before
    assert texts[0] == texts[1] == texts[2]
