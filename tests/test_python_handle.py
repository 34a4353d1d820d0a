"""The Python API through Serve handles, and its agreement with HTTP."""

from __future__ import annotations

import pytest
from ray import serve

from deployments import GenerateChunk, GenerateRequest, GenerateResponse, StructuredOutput
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


async def test_handle_structured_output(server, http) -> None:
    """The typed request's structured_output is what response_format maps to over HTTP."""
    handle = serve.get_app_handle(APP_NAME)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    request = GenerateRequest(
        prompt="Is it?", max_tokens=32, temperature=0, structured_output=StructuredOutput(json_schema=schema)
    )
    response = await handle.generate.remote(request)
    assert response.outputs[0].finish_reason == "stop"
    assert response.outputs[0].text in ('{"ok": true}', '{"ok": false}')
    response_format = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    body = {"prompt": "Is it?", "max_tokens": 32, "temperature": 0, "response_format": response_format}
    over_http = http.post("/v1/completions", json=body).json()
    assert over_http["choices"][0]["text"] == response.outputs[0].text
    with pytest.raises(InvalidRequest) as info:
        await handle.generate.remote(GenerateRequest(prompt="x", structured_output=StructuredOutput(regex="(")))
    assert info.value.param == "structured_output"


async def test_handle_tool_calls_and_embeddings(server, http) -> None:
    """The typed requests carry tools and embeddings as the HTTP routes do."""
    from deployments import EmbedRequest
    from deployments.tools import Tool

    handle = serve.get_app_handle(APP_NAME)
    tool = Tool.model_validate(
        {"function": {"name": "ping", "parameters": {"type": "object", "properties": {"n": {"enum": [1, 2]}}}}}
    )
    request = GenerateRequest(
        messages=[{"role": "user", "content": "ping"}], tools=[tool], tool_choice="required", max_tokens=80, temperature=0
    )
    response = await handle.generate.remote(request)
    out = response.outputs[0]
    assert out.finish_reason == "tool_calls" and [c.function.name for c in out.tool_calls] == ["ping"] * len(out.tool_calls)
    embedded = await handle.embed.remote(EmbedRequest(inputs=["a fox", "a dog"], dimensions=8))
    assert [len(v) for v in embedded.embeddings] == [8, 8] and embedded.prompt_tokens > 2
    over_http = http.post(
        "/v1/embeddings", json={"input": ["a fox", "a dog"], "dimensions": 8, "encoding_format": "float"}
    ).json()
    assert [d["embedding"] for d in over_http["data"]] == embedded.embeddings
