"""Every request limit from the config, over HTTP: each violation is a clear 4xx naming what was
too big, and the replica serves the next request normally."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from ray import serve

from deployments.app import build_app

from .conftest import TEST_ARGS, wait_until

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
    args = {**TEST_ARGS, "served_model_name": "limited", "limits": LIMITS}
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
