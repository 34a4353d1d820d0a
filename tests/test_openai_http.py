"""The OpenAI-compatible routes, through the official openai client and raw HTTP."""

from __future__ import annotations

import json

import openai
import pytest

PROMPT = "The quick brown fox"


def test_models_list(openai_client) -> None:
    models = openai_client.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]
    assert models.data[0].object == "model"


def test_completion_greedy_is_deterministic_and_counts_usage(openai_client) -> None:
    a = openai_client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=12, temperature=0)
    b = openai_client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=12, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].finish_reason == "length"
    assert a.usage.completion_tokens == 12
    assert a.usage.prompt_tokens > 0
    assert a.usage.total_tokens == a.usage.prompt_tokens + 12
    assert a.id.startswith("cmpl-") and a.id != b.id
    assert a.object == "text_completion" and a.created > 1_700_000_000


def test_completion_prompt_list_n_and_echo(openai_client) -> None:
    res = openai_client.completions.create(
        model="tiny-llama", prompt=["Hello", "world"], max_tokens=4, temperature=0.8, seed=7, n=2
    )
    assert sorted(c.index for c in res.choices) == [0, 1, 2, 3]
    assert res.usage.completion_tokens == 16
    echo = openai_client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=3, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("Hello")


def test_seeded_sampling_reproducible(openai_client) -> None:
    kwargs = dict(model="tiny-llama", prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    first = openai_client.completions.create(**kwargs).choices[0].text
    assert openai_client.completions.create(**kwargs).choices[0].text == first
    other = openai_client.completions.create(**{**kwargs, "seed": 99}).choices[0].text
    assert other != first


def test_completion_logprobs(openai_client) -> None:
    res = openai_client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == 5 and len(lp.token_logprobs) == 5
    assert all(len(top) <= 3 for top in lp.top_logprobs)
    # Greedy picks the most likely token: no alternative is more likely (the dict is keyed by
    # token text, so two tokens that decode alike share one entry).
    assert all(t >= max(top.values()) - 1e-5 for t, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True))


def test_stop_string_ends_with_stop(openai_client) -> None:
    full = openai_client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    stop = full[5:8]
    assert stop
    res = openai_client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert res.choices[0].finish_reason == "stop"
    assert res.choices[0].text == full[: full.index(stop)]


def test_chat_completion(openai_client) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    a = openai_client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=8, temperature=0)
    b = openai_client.chat.completions.create(model="tiny-llama", messages=messages, max_completion_tokens=8, temperature=0)
    assert a.choices[0].message.role == "assistant"
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].finish_reason == "length"
    assert a.usage.completion_tokens == 8
    assert a.id.startswith("chatcmpl-") and a.object == "chat.completion"


def test_chat_logprobs(openai_client) -> None:
    res = openai_client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = res.choices[0].logprobs.content
    assert len(content) == 4
    assert all(len(c.top_logprobs) == 2 for c in content)


def test_chat_stream_matches_non_stream(openai_client) -> None:
    messages = [{"role": "user", "content": "tell me a story"}]
    whole = openai_client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=10, temperature=0)
    stream = openai_client.chat.completions.create(
        model="tiny-llama",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_completion_stream_raw_sse(http) -> None:
    body = {
        "model": "tiny-llama",
        "prompt": ["Hello", "world"],
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "n": 2,
    }
    with http.stream("POST", "/v1/completions", json=body) as res:
        assert res.status_code == 200
        assert res.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in res.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    finished = {e["choices"][0]["index"]: e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["finish_reason"]}
    assert finished == {0: "length", 1: "length", 2: "length", 3: "length"}
    whole = http.post("/v1/completions", json={**body, "stream": False}).json()
    for choice in whole["choices"]:
        streamed = "".join(e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == choice["index"])
        assert streamed == choice["text"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 100000}, "max_tokens"),
        ({"prompt": "x", "temperature": 3}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "n": 50}, "n"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": "x " * 1500}, "prompt"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ],
)
def test_completion_bad_input_is_400(http, body, param) -> None:
    res = http.post("/v1/completions", json=body)
    assert res.status_code == 400, res.text
    err = res.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert (err["param"] or "").startswith(param), err
    assert "Traceback" not in res.text


def test_chat_bad_input_is_400(http) -> None:
    for body, param in [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({}, "messages"),
    ]:
        res = http.post("/v1/chat/completions", json=body)
        assert res.status_code == 400, res.text
        assert (res.json()["error"]["param"] or "").startswith(param)


def test_malformed_json_is_400(http) -> None:
    res = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert res.status_code == 400
    assert res.json()["error"]["message"] == "request body is not valid JSON"


def test_unknown_model_is_404(openai_client) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        openai_client.completions.create(model="gpt-9", prompt="x", max_tokens=2)
    assert info.value.body["code"] == "model_not_found"


def test_oversized_body_is_413_and_server_keeps_serving(http) -> None:
    res = http.post("/v1/completions", json={"prompt": "x" * 200_000, "max_tokens": 2})
    assert res.status_code == 413
    assert res.json()["error"]["code"] == "request_too_large"
    ok = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})
    assert ok.status_code == 200


def test_openai_client_stream_errors_before_first_byte(openai_client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.completions.create(model="tiny-llama", prompt="x", max_tokens=5000, stream=True)
    assert info.value.body["code"] == "context_length_exceeded"
