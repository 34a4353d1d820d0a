"""/v1/responses through the official openai client: whole and streamed answers agree with the
chat route's, instructions are a system turn, and whatever is not honoured is a 400 naming it."""

from __future__ import annotations

import json

import openai
import pytest


def test_response_matches_chat_and_reports_usage(openai_client) -> None:
    res = openai_client.responses.create(
        model="tiny-llama", input="Hello there", instructions="Be brief.", max_output_tokens=12, temperature=0, store=False
    )
    chat = openai_client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        max_tokens=12,
        temperature=0,
    )
    assert res.object == "response" and res.id.startswith("resp_")
    assert res.output_text == chat.choices[0].message.content
    assert res.status == "incomplete" and res.incomplete_details.reason == "max_output_tokens"
    assert res.usage.input_tokens == chat.usage.prompt_tokens and res.usage.output_tokens == 12
    assert res.usage.total_tokens == res.usage.input_tokens + 12
    assert res.output[0].role == "assistant" and res.output[0].content[0].type == "output_text"
    assert res.instructions == "Be brief." and res.store is False


def test_message_list_input_and_json_schema_format(openai_client) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    res = openai_client.responses.create(
        model="tiny-llama",
        input=[
            {"role": "user", "content": "Is it?"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Maybe."}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Answer as JSON."}]},
        ],
        max_output_tokens=32,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}},
    )
    assert res.status == "completed", res
    assert json.loads(res.output_text)["ok"] in (True, False)


def test_streamed_events_in_order_and_text_agrees(openai_client) -> None:
    kwargs = dict(model="tiny-llama", input="Tell me a story", max_output_tokens=10, temperature=0)
    whole = openai_client.responses.create(**kwargs)
    events = list(openai_client.responses.create(**kwargs, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-1].response.output_text == whole.output_text and events[-1].response.usage.output_tokens == 10


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("store", True),
        ("previous_response_id", "resp_123"),
        ("tools", [{"type": "function", "name": "f", "parameters": {}}]),
        ("reasoning", {"effort": "high"}),
        ("background", True),
    ],
)
def test_unhonoured_fields_are_400_naming_them(http, field, value) -> None:
    res = http.post("/v1/responses", json={"input": "hi", field: value})
    assert res.status_code == 400, res.text
    err = res.json()["error"]
    assert err["param"] == field and "not support" in err["message"], err


def test_bad_input_is_400_before_the_stream(openai_client, http) -> None:
    for body, param in [({"input": ""}, "input"), ({}, "input"), ({"input": "x", "max_output_tokens": 0}, "max_output_tokens")]:
        res = http.post("/v1/responses", json={**body, "stream": True})
        assert res.status_code == 400 and (res.json()["error"]["param"] or "").startswith(param), res.text
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.responses.create(model="tiny-llama", input="x", max_output_tokens=100_000, stream=True)
    assert info.value.body["param"] == "max_output_tokens"
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.create(model="other", input="x")
