"""The Python API through Serve handles, and its agreement with HTTP."""

from __future__ import annotations

import pytest
from ray import serve

from deployments import GenerateChunk, GenerateRequest, GenerateResponse
from deployments.errors import InvalidRequest

from .conftest import APP_NAME


async def test_handle_generate_matches_http(server, http) -> None:
    handle = serve.get_app_handle(APP_NAME)
    response = await handle.generate.remote(GenerateRequest(prompt="Hello world", max_tokens=10, temperature=0))
    assert isinstance(response, GenerateResponse)
    over_http = http.post("/v1/completions", json={"prompt": "Hello world", "max_tokens": 10, "temperature": 0}).json()
    assert response.outputs[0].text == over_http["choices"][0]["text"]
    assert response.usage.completion_tokens == 10 == len(response.outputs[0].token_ids)


async def test_handle_stream_matches_whole(server) -> None:
    handle = serve.get_app_handle(APP_NAME)
    request = GenerateRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0)
    chunks = [c async for c in handle.options(stream=True).generate_stream.remote(request)]
    assert all(isinstance(c, GenerateChunk) for c in chunks)
    whole = await handle.generate.remote(request)
    assert "".join(c.text for c in chunks) == whole.outputs[0].text
    assert [t for c in chunks for t in c.token_ids] == whole.outputs[0].token_ids
    assert chunks[-1].finish_reason == "length"


async def test_handle_bad_request_raises_typed_error(server) -> None:
    handle = serve.get_app_handle(APP_NAME)
    with pytest.raises(InvalidRequest) as info:
        await handle.generate.remote(GenerateRequest(prompt="x", max_tokens=10_000))
    assert info.value.param == "max_tokens"
    assert info.value.status_code == 400
