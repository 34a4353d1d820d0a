"""Structured output over HTTP through the official openai client: OpenAI's response_format and
vLLM's structured_outputs (and its older guided_* fields), streamed and whole, cached apart from
unconstrained answers, and every malformed constraint a 400 naming its field."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "population": {"type": "integer", "minimum": 0, "maximum": 99999},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "population", "capital"],
    "additionalProperties": False,
}
CHAT = [{"role": "user", "content": "Name a city as JSON."}]


def test_chat_json_schema_validates_whole_and_streamed(openai_client) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    for temperature, seed in ((0, None), (1.0, 3)):
        res = openai_client.chat.completions.create(
            model="tiny-llama", messages=CHAT, max_tokens=80, temperature=temperature, seed=seed, response_format=response_format
        )
        choice = res.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), CITY)
    stream = openai_client.chat.completions.create(
        model="tiny-llama", messages=CHAT, max_tokens=80, temperature=0, response_format=response_format, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (
        text
        == openai_client.chat.completions.create(
            model="tiny-llama", messages=CHAT, max_tokens=80, temperature=0, response_format=response_format
        )
        .choices[0]
        .message.content
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_json_object_regex_choice_grammar_on_completions(openai_client) -> None:
    def complete(**extra):
        return openai_client.completions.create(
            model="tiny-llama", prompt="Answer:", max_tokens=96, temperature=0, extra_body=extra
        )

    obj = openai_client.chat.completions.create(
        model="tiny-llama", messages=CHAT, max_tokens=48, temperature=0, response_format={"type": "json_object"}
    )
    assert obj.choices[0].message.content.startswith("{")
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    regex = complete(structured_outputs={"regex": r"[A-Z][a-z]{2,5} \d{2}"}).choices[0]
    assert regex.finish_reason == "stop" and re.fullmatch(r"[A-Z][a-z]{2,5} \d{2}", regex.text), regex
    choice = complete(structured_outputs={"choice": ["red", "green", "blue"]}).choices[0]
    assert choice.text in ("red", "green", "blue") and choice.finish_reason == "stop"
    grammar = complete(structured_outputs={"grammar": 'root ::= "x=" [0-9] [0-9]? ";"'}).choices[0]
    assert re.fullmatch(r"x=\d\d?;", grammar.text), grammar
    schema_text = complete(structured_outputs={"json": json.dumps(CITY)}).choices[0]
    assert schema_text.finish_reason == "stop", schema_text
    jsonschema.validate(json.loads(schema_text.text), CITY)
    legacy = complete(guided_choice=["yes", "no"]).choices[0]
    assert legacy.text in ("yes", "no")


def test_constraint_is_part_of_the_result_cache_key(openai_client, engine_stats) -> None:
    """The same prompt with and without a constraint are two answers: neither is served for the
    other from the result cache, and a repeated constrained request is a hit."""
    common = dict(model="tiny-llama", prompt="Cached?", max_tokens=8, temperature=0)
    free = openai_client.completions.create(**common).choices[0].text
    constrained = openai_client.completions.create(**common, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert constrained.choices[0].text in ("yes", "no") and constrained.choices[0].text != free
    steps = engine_stats().num_steps
    again = openai_client.completions.create(**common, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert again.choices[0].text == constrained.choices[0].text
    assert engine_stats().num_steps == steps  # answered without a step


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "json_schema.schema"),
        ({"response_format": {"type": "yaml"}}, "response_format.type", ""),
        ({"structured_outputs": {"regex": "[a-"}}, "structured_output", "Unclosed"),
        ({"structured_outputs": {"grammar": "root ::= "}}, "structured_output", "grammar cannot be compiled"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs", "non-empty"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "not a JSON schema"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag", ""),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, None, "one constraint per request"),
    ],
)
def test_malformed_constraints_are_400_naming_the_field(http, body, param, message) -> None:
    for route, base in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": CHAT})):
        res = http.post(route, json={**base, "max_tokens": 4, **body})
        assert res.status_code == 400, res.text
        err = res.json()["error"]
        assert err["param"] == param and message in err["message"], err
        assert "Traceback" not in res.text and "/project/" not in res.text
