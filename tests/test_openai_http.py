"""The OpenAI-compatible routes, through the official openai client and raw HTTP."""

from __future__ import annotations

import json

import openai
import pytest

from .conftest import kernels_expected

PROMPT = "The quick brown fox"


def test_models_list(openai_client) -> None:
    models = openai_client.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]
    assert models.data[0].object == "model"


def test_models_list_says_what_the_replica_computes_with(http) -> None:
    """Where an operator sees that a kernel fell back (also the shardserve:model_info labels)."""
    (model,) = http.get("/v1/models").json()["data"]
    backend = "cpu_paged" if kernels_expected() else "gather_sdpa"
    assert (model["dtype"], model["attention_backend"], model["fused_ops"]) == ("float32", backend, kernels_expected())


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
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
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
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ]:
        res = http.post("/v1/chat/completions", json=body)
        assert res.status_code == 400, res.text
        assert (res.json()["error"]["param"] or "").startswith(param)


@pytest.mark.parametrize(
    ("route", "field", "value"),
    [
        ("/v1/completions", "audio", {"voice": "alloy", "format": "wav"}),
        ("/v1/completions", "best_of", 3),
        ("/v1/completions", "suffix", " the end"),
        ("/v1/chat/completions", "function_call", "auto_please"),
        ("/v1/chat/completions", "reasoning_effort", "low"),
        ("/v1/chat/completions", "store", True),
    ],
)
def test_fields_not_honoured_are_refused_by_name(http, route, field, value) -> None:
    """A field that would change the answer and is not implemented is a 400 naming it, never a
    200 that dropped it; the values that ask for nothing (SDK defaults) still pass."""
    base = {"prompt": PROMPT} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    res = http.post(route, json={**base, "max_tokens": 2, field: value})
    assert res.status_code == 400, res.text
    err = res.json()["error"]
    assert err["param"] == field and "not support" in err["message"], err


def test_neutral_values_of_unhonoured_fields_pass(openai_client) -> None:
    res = openai_client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        response_format={"type": "text"},
        tool_choice="none",
        store=False,
        extra_body={"ignore_eos": True},  # sampled at the default temperature: EOS must not end it early
    )
    assert res.choices[0].finish_reason == "length"


def test_logit_bias_forces_and_bans_tokens(openai_client, http) -> None:
    from transformers import AutoTokenizer

    from parallel.checkpoints.loading import resolve_model_dir

    tok = AutoTokenizer.from_pretrained(resolve_model_dir("shardserve/tiny-llama"))
    common = dict(model="tiny-llama", prompt=PROMPT, max_tokens=6, extra_body={"cache": False})
    forced = openai_client.completions.create(**common, temperature=0, logit_bias={"77": 100})
    drawn = openai_client.completions.create(**common, temperature=1.0, seed=3, logit_bias={"77": 100})
    assert forced.choices[0].text == drawn.choices[0].text == tok.decode([77] * 6)
    first = openai_client.completions.create(**{**common, "max_tokens": 1}, temperature=0).choices[0].text
    alike = {str(i): -100 for i in range(len(tok)) if tok.decode([i]) == first}  # every id that reads as it
    assert alike
    banned = openai_client.completions.create(**{**common, "max_tokens": 1}, temperature=0, logit_bias=alike)
    assert banned.choices[0].text != first
    res = http.post("/v1/completions", json={"prompt": PROMPT, "logit_bias": {"100000": 5}})
    assert res.status_code == 400 and res.json()["error"]["param"] == "logit_bias", res.text
    res = http.post("/v1/completions", json={"prompt": PROMPT, "logit_bias": {"5": 101}})
    assert res.status_code == 400 and res.json()["error"]["param"] == "logit_bias", res.text
    res = http.post("/v1/completions", json={"prompt": PROMPT, "presence_penalty": 2.5})
    assert res.status_code == 400 and res.json()["error"]["param"] == "presence_penalty", res.text


def test_tokenize_counts_what_generation_reads_and_detokenize_inverts(openai_client, http) -> None:
    res = http.post("/tokenize", json={"model": "tiny-llama", "prompt": PROMPT})
    assert res.status_code == 200, res.text
    body = res.json()
    usage = openai_client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=1, temperature=0).usage
    assert body["count"] == len(body["tokens"]) == usage.prompt_tokens and body["max_model_len"] > body["count"]
    messages = [{"role": "user", "content": "hi there"}]
    chat = http.post("/tokenize", json={"messages": messages}).json()
    chat_usage = openai_client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=1).usage
    assert chat["count"] == chat_usage.prompt_tokens
    plain = http.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()
    back = http.post("/detokenize", json={"model": "tiny-llama", "tokens": plain["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": PROMPT}
    for route, bad, param in [
        ("/detokenize", {"tokens": [10**9]}, "tokens"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": messages}, "prompt"),
        ("/tokenize", {"messages": []}, "messages"),
    ]:
        res = http.post(route, json=bad)
        assert res.status_code == 400 and res.json()["error"]["param"] == param, res.text
    assert http.post("/tokenize", json={"model": "other", "prompt": "a"}).status_code == 404


def test_stop_token_ids_and_min_tokens(http) -> None:
    """Token 77 is forced by a +100 bias: as a stop token it ends the output at once, and
    min_tokens holds it back for exactly that many tokens."""
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logit_bias": {"77": 100}, "stop_token_ids": [77]}
    body["cache"] = False
    at_once = http.post("/v1/completions", json=body).json()
    assert at_once["choices"][0]["finish_reason"] == "stop" and at_once["choices"][0]["text"] == ""
    held = http.post("/v1/completions", json={**body, "min_tokens": 3}).json()
    assert held["choices"][0]["finish_reason"] == "stop"
    assert held["usage"]["completion_tokens"] == 4  # three others, then the stop token
    res = http.post("/v1/completions", json={**body, "min_tokens": 9})
    assert res.status_code == 400 and res.json()["error"]["param"] == "min_tokens", res.text
    res = http.post("/v1/completions", json={**body, "stop_token_ids": [10**9]})
    assert res.status_code == 400 and res.json()["error"]["param"] == "stop_token_ids", res.text
    # A stop string inside the first min_tokens does not end the output either.
    free = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "cache": False}
    full = http.post("/v1/completions", json=free).json()["choices"][0]["text"]
    stop = full[2:4]
    assert http.post("/v1/completions", json={**free, "stop": [stop]}).json()["choices"][0]["text"] == full[: full.find(stop)]
    late = http.post("/v1/completions", json={**free, "stop": [stop], "min_tokens": 12}).json()["choices"][0]
    assert late["text"] == full and late["finish_reason"] == "length"


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
