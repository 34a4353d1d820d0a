"""Every request limit from the config, over HTTP, and hostile input: each violation is a clear
4xx naming what was too big, the replica serves the next request normally, and fuzzing the app
from its own OpenAPI schema finds no 5xx and kills no replica."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from ray import serve

from deployments.app import build_app

from .conftest import APP_NAME, TEST_ARGS, wait_until

LIMITS = {
    "max_request_body_bytes": 65536,
    "max_n": 2,
    "max_prompts": 3,
    "max_stop_sequences": 2,
    "max_stop_chars": 10,
    "max_prompt_tokens": 40,
    "max_tokens": 16,
    "max_messages": 3,
}
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def limited(server: str) -> Iterator[httpx.Client]:
    args = {**TEST_ARGS, "served_model_name": "limited", "limits": LIMITS, "log_prompts": True}
    serve.run(build_app(args), name="limited", route_prefix="/limited")
    with httpx.Client(base_url=f"{server}/limited", timeout=60) as client:
        wait_until(lambda: client.get("/ready").status_code == 200, timeout_s=120)
        yield client
    serve.delete("limited")


def still_serves(client: httpx.Client) -> None:
    res = client.post(COMPLETIONS, json={"prompt": "hello", "max_tokens": 2, "temperature": 0})
    assert res.status_code == 200, res.text
    assert res.json()["usage"]["completion_tokens"] == 2


def error_of(res: httpx.Response, status: int = 400) -> dict:
    assert res.status_code == status, res.text
    assert "Traceback" not in res.text and ".py" not in res.text
    err = res.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


def many_messages(k: int) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(k)]


@pytest.mark.parametrize(
    ("route", "body", "param", "says"),
    [
        (COMPLETIONS, {"prompt": "x", "n": 3, "max_tokens": 2}, "n", "at most 2"),
        (COMPLETIONS, {"prompt": ["a", "b", "c", "d"], "max_tokens": 2}, "prompt", "at most 3 prompts"),
        (COMPLETIONS, {"prompt": "x", "stop": ["a", "b", "c"], "max_tokens": 2}, "stop", "at most 2 stop"),
        (COMPLETIONS, {"prompt": "x", "stop": ["y" * 11], "max_tokens": 2}, "stop", "at most 10 characters"),
        (COMPLETIONS, {"prompt": "word " * 60, "max_tokens": 2}, "prompt", "at most 40 are allowed"),
        (COMPLETIONS, {"prompt": [list(range(5, 46))], "max_tokens": 2}, "prompt", "at most 40 are allowed"),
        (COMPLETIONS, {"prompt": "x", "max_tokens": 17}, "max_tokens", "at most 16"),
        (CHAT, {"messages": many_messages(4), "max_tokens": 2}, "messages", "at most 3 messages"),
        (CHAT, {"messages": [{"role": "user", "content": "word " * 60}], "max_tokens": 2}, "messages", "at most 40"),
        (CHAT, {"messages": many_messages(1), "max_tokens": 17}, "max_tokens", "at most 16"),
    ],
)
def test_each_limit_is_a_clear_400(limited: httpx.Client, route: str, body: dict, param: str, says: str) -> None:
    err = error_of(limited.post(route, json=body))
    assert err["type"] == "invalid_request_error"
    assert (err["param"] or "").startswith(param), err
    assert says in err["message"], err
    still_serves(limited)


def test_default_max_tokens_is_capped_by_the_limit(limited: httpx.Client) -> None:
    res = limited.post(COMPLETIONS, json={"prompt": "hello", "ignore_eos": True, "temperature": 0})
    assert res.status_code == 200, res.text
    assert res.json()["usage"]["completion_tokens"] == 16


def test_tf_serving_instances_limit(limited: httpx.Client) -> None:
    res = limited.post("/v1/models/limited:predict", json={"instances": ["a", "b", "c", "d"]})
    assert res.status_code == 400
    assert "at most 3 instances" in res.json()["error"]
    still_serves(limited)


def test_50_mb_body_is_413_before_it_is_read(limited: httpx.Client) -> None:
    """Refused on Content-Length alone, and a chunked body (no length) as soon as it passes the limit."""
    big = b'{"prompt": "' + b"x" * (50 * 2**20) + b'", "max_tokens": 2}'
    start = time.monotonic()
    err = error_of(limited.post(COMPLETIONS, content=big), status=413)
    assert err["code"] == "request_too_large" and "65536 bytes" in err["message"]

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 2**20):
            yield big[i : i + 2**20]

    try:
        res = limited.post(COMPLETIONS, content=chunks())
        assert error_of(res, status=413)["code"] == "request_too_large"
    except httpx.WriteError:
        pass  # the server answered 413 and closed the connection while the client was still sending
    assert time.monotonic() - start < 10
    still_serves(limited)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": "caf\xc3", "max_tokens": 2}',  # truncated UTF-8 sequence
        b'{"prompt": "\xff\xfe\xfd", "max_tokens": 2}',  # bytes that are never UTF-8
        b'{"prompt": "\\ud800", "max_tokens": 2}',  # a lone surrogate: valid JSON, not encodable text
        b"\xef\xbb\xbf\x00\x00",
    ],
)
def test_invalid_utf8_is_400(limited: httpx.Client, raw: bytes) -> None:
    err = error_of(limited.post(COMPLETIONS, content=raw, headers={"content-type": "application/json"}))
    assert err["type"] == "invalid_request_error"
    assert "UTF-8" in err["message"] or "JSON" in err["message"], err
    still_serves(limited)


def test_escaped_surrogate_pair_is_text(limited: httpx.Client) -> None:
    raw = b'{"prompt": "\\ud83d\\ude00 hi", "max_tokens": 2, "temperature": 0}'  # an emoji, escaped
    res = limited.post(COMPLETIONS, content=raw, headers={"content-type": "application/json"})
    assert res.status_code == 200, res.text


def replica_actors(app: str) -> set[str]:
    from ray._private import state as gcs_state

    return {
        actor_id
        for actor_id, a in gcs_state.actors().items()
        if a["State"] == "ALIVE" and a["ActorClassName"].startswith(f"ServeReplica:{app}:")
    }


def test_fuzzing_the_openapi_schema_finds_no_5xx(limited: httpx.Client) -> None:
    """schemathesis generates bodies, paths and queries from the schema (valid ones, then ones
    that break it) for every operation; a bounded number of examples each."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    raw = limited.get("/openapi.json").json()
    raw.pop("servers", None)
    schema = schemathesis.openapi.from_dict(raw)
    base_url = str(limited.base_url).rstrip("/")
    before = replica_actors("limited")
    failures: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @settings(max_examples=12, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case: schemathesis.Case) -> None:
                nonlocal calls
                calls += 1
                res = case.call(base_url=base_url, timeout=60)
                if res.status_code >= 500 or "Traceback" in res.text:
                    failures.append(f"{case.operation.label}: {res.status_code} {res.text[:200]} <- {case.body!r:.200}")

            try:
                call()
            except Unsatisfiable:  # nothing to break in an operation without parameters or body
                assert mode == schemathesis.GenerationMode.NEGATIVE
    assert calls > 100
    assert not failures, "\n".join(failures[:10])
    assert replica_actors("limited") == before  # no replica died or was replaced
    still_serves(limited)


def logs_containing(needle: str) -> list[str]:
    """Names of the Ray session's log files (every process: replicas, proxy, controller, raylet)
    that contain `needle`."""
    from pathlib import Path

    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    return [str(f.relative_to(logs)) for f in logs.rglob("*") if f.is_file() and needle.encode() in f.read_bytes()]


def test_prompts_and_outputs_are_not_logged_unless_asked(http: httpx.Client, limited: httpx.Client) -> None:
    """The shared app runs with the default `log_prompts: false`; the limited one turned it on."""
    secret, asked = "zebra-secret-4711", "okapi-logged-4712"
    body = {"max_tokens": 5, "temperature": 0, "n": 2, "cache": False}
    res = http.post(COMPLETIONS, json={**body, "prompt": f"my password is {secret}"})
    assert res.status_code == 200
    output = res.json()["choices"][0]["text"]
    assert limited.post(COMPLETIONS, json={**body, "prompt": f"log me {asked}"}).status_code == 200
    # Both requests' lines are written (the one asked for proves the search sees replica logs).
    wait_until(lambda: logs_containing(asked), timeout_s=30, interval_s=0.5)
    request_line = wait_until(lambda: [f for f in logs_containing("n=2 prompt_tokens=") if f"replica_{APP_NAME}_LLMServer" in f])
    assert request_line, "the shared app logs the request's ids and counts"
    assert logs_containing(secret) == []
    if len(output.strip()) >= 8:
        assert logs_containing(output) == []
