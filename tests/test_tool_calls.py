"""Tool calls: offered through the chat template, required and named calls enforced by
structured output (their arguments validate even on a random-weight model), auto calls parsed
from the checkpoint's own format, whole and streamed, through the official openai client."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from deployments.replica.tool_calls import ToolCallStream, format_of, parse_tool_calls, tool_constraint
from deployments.tools import Tool, merged
from deployments.types import GenerateRequest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def request(**kw) -> GenerateRequest:
    return GenerateRequest(messages=ASK, tools=[Tool.model_validate(t) for t in (WEATHER, TIME)], **kw)


def test_formats_parse_as_their_checkpoints_write_them() -> None:
    auto = request()
    hermes = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
    hermes += '\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    content, calls = parse_tool_calls(auto, hermes, "hermes")
    assert content == "Let me look."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "c"}),
        ("get_time", {}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    _, calls = parse_tool_calls(auto, '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "f"}}', "llama3_json")
    assert json.loads(calls[0].function.arguments) == {"city": "Oslo", "unit": "f"}
    _, calls = parse_tool_calls(auto, '[{"name": "get_time", "arguments": {}}]', "mistral")
    assert calls[0].function.name == "get_time"
    for text, fmt in [
        ('<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>', "hermes"),  # not offered
        ("<tool_call>{not json</tool_call>", "hermes"),
        ("Just an answer.", "llama3_json"),
    ]:
        assert parse_tool_calls(auto, text, fmt) == (text, [])
    assert format_of("...{{ '[TOOL_CALLS]' }}...") == "mistral"
    assert format_of("...<tool_call>...") == "hermes"
    assert format_of("...<|python_tag|>...") == "llama3_json"
    assert format_of(None) == "hermes"


@pytest.mark.parametrize(
    ("fmt", "text", "choice"),
    [
        ("hermes", 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>', None),
        ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}', None),
        ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}]', None),
        ("hermes", '[{"name":"get_weather","parameters":{"city":"Paris","unit":"c"}}]', "required"),
        ("hermes", '{"city":"Paris","unit":"c"}', {"type": "function", "function": {"name": "get_weather"}}),
    ],
)
def test_calls_stream_argument_by_argument(fmt, text, choice) -> None:
    """Fed a character at a time, as the model writes: the content streams until the call
    starts, the call is announced as soon as its name is written, and its arguments follow
    piece by piece, adding up to the arguments the whole answer parses to."""
    req = request(tool_choice=choice) if choice else request()
    stream = ToolCallStream(req, fmt)
    content, deltas, named_after = "", [], None
    for i, ch in enumerate(text):
        said, new = stream.feed(ch)
        content += said
        if new and named_after is None:
            named_after = i + 1
        deltas += new
    rest, more = stream.finish()
    assert stream.made_calls and rest == "" and more == []
    assert content == ("Sure." if text.startswith("Sure") else "")
    assert deltas[0].name == "get_weather" and deltas[0].id.startswith("call_")
    if choice is None or choice == "required":  # the name is announced before the arguments are written
        assert named_after <= text.index('"get_weather"') + len('"get_weather"') + 1
    pieces = [d.arguments for d in deltas]
    assert sum(1 for p in pieces if p) >= 10
    assert json.loads("".join(pieces)) == {"city": "Paris", "unit": "c"}
    [call] = merged(deltas)
    assert parse_tool_calls(req, text, fmt)[1][0].function.arguments == call.function.arguments


def test_required_and_named_choices_are_constraints() -> None:
    required = tool_constraint(request(tool_choice="required", parallel_tool_calls=False)).json_schema
    assert required["minItems"] == 1 and required["maxItems"] == 1
    assert [o["properties"]["name"]["const"] for o in required["items"]["anyOf"]] == ["get_weather", "get_time"]
    named = tool_constraint(request(tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert named.json_schema == WEATHER["function"]["parameters"]
    assert tool_constraint(request()) is None and tool_constraint(request(tool_choice="none")) is None
    for bad, match in [
        (dict(tool_choice={"type": "function", "function": {"name": "nope"}}), "not among the tools"),
        (dict(tool_choice="required", structured_output={"regex": "a"}), "itself a constraint"),
    ]:
        with pytest.raises(ValueError, match=match):
            request(**bad)
    with pytest.raises(ValueError, match="needs tools"):
        GenerateRequest(messages=ASK, tool_choice="required")
    with pytest.raises(ValueError, match="need messages"):
        GenerateRequest(prompt="x", tools=[Tool.model_validate(TIME)])


def test_named_tool_choice_returns_a_valid_call(openai_client) -> None:
    res = openai_client.chat.completions.create(
        model="tiny-llama",
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=64,
        temperature=0,
    )
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_required_calls_whole_and_streamed(openai_client) -> None:
    kwargs = dict(model="tiny-llama", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=96, temperature=0)
    whole = openai_client.chat.completions.create(**kwargs, parallel_tool_calls=False).choices[0]
    assert whole.finish_reason == "tool_calls" and len(whole.message.tool_calls) == 1
    [call] = whole.message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    schema = (WEATHER if call.function.name == "get_weather" else TIME)["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    chunks = list(openai_client.chat.completions.create(**kwargs, parallel_tool_calls=False, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    # Announced once with its id and name, then its arguments as they are written.
    first, *rest = deltas
    assert (first.index, first.type, first.function.name) == (0, "function", call.function.name)
    assert first.id.startswith("call_") and all(d.id is None and d.function.name is None and d.index == 0 for d in rest)
    assert first.function.arguments + "".join(d.function.arguments for d in rest) == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_auto_calls_are_parsed_from_the_model_format(openai_client) -> None:
    """The built-in template teaches Hermes' format; a grammar makes the random model write a
    call in it, which auto parses (and text that makes no call stays the answer)."""
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>'
    grammar = "root ::= " + json.dumps(call)
    res = openai_client.chat.completions.create(
        model="tiny-llama",
        messages=ASK,
        tools=[WEATHER],
        max_tokens=200,
        temperature=0,
        extra_body={"structured_outputs": {"grammar": grammar}},
    )
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Paris", "unit": "c"}
    plain = openai_client.chat.completions.create(model="tiny-llama", messages=ASK, tools=[WEATHER], max_tokens=8, temperature=0)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "length"
    assert plain.choices[0].message.content


def test_tool_turns_render_through_the_template(openai_client, http) -> None:
    """An assistant's calls and the tool's result go back to the model in the next request."""
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    res = openai_client.chat.completions.create(
        model="tiny-llama", messages=history, tools=[WEATHER], max_tokens=4, temperature=0
    )
    assert res.choices[0].finish_reason in ("length", "stop", "tool_calls")
    shorter = openai_client.chat.completions.create(
        model="tiny-llama", messages=ASK, tools=[WEATHER], max_tokens=4, temperature=0
    )
    assert res.usage.prompt_tokens > shorter.usage.prompt_tokens + 10
    without_tools = openai_client.chat.completions.create(model="tiny-llama", messages=ASK, max_tokens=4, temperature=0)
    assert shorter.usage.prompt_tokens > without_tools.usage.prompt_tokens  # the tools are in the prompt


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"functions": [WEATHER["function"]]}, "functions"),
    ],
)
def test_bad_tool_requests_are_400_naming_the_field(http, body, param) -> None:
    res = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **body})
    assert res.status_code == 400, res.text
    assert (res.json()["error"]["param"] or "").startswith(param), res.text


def test_tool_choice_none_offers_no_calls(openai_client) -> None:
    res = openai_client.chat.completions.create(
        model="tiny-llama", messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=4, temperature=0
    )
    assert res.choices[0].message.tool_calls is None
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(model="tiny-llama", messages=ASK, tool_choice="required", max_tokens=4)


HISTORY = [
    {"role": "system", "content": "Be brief."},
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_0123456789abcdef", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_0123456789abcdef", "content": "18 degrees"},
]


@pytest.mark.parametrize(
    ("shape", "fmt", "offered", "call", "result"),
    [
        ("qwen2.5-7b-instruct", "hermes", "<tools>\n{",
         '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call><|im_end|>',
         "<|im_start|>user\n<tool_response>\n18 degrees\n</tool_response><|im_end|>"),
        ("llama-3.2-1b-instruct", "llama3_json", "Environment: ipython\n",
         '<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}<|eot_id|>',
         '<|start_header_id|>ipython<|end_header_id|>\n\n{"output": "18 degrees"}<|eot_id|>'),
        ("mistral-7b-instruct-v0.3", "mistral", "[AVAILABLE_TOOLS] [{",
         '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}, "id": "789abcdef"}]</s>',
         '[TOOL_RESULTS] {"content": "18 degrees", "call_id": "789abcdef"}[/TOOL_RESULTS]'),
    ],
)  # fmt: skip
def test_shaped_checkpoints_offer_tools_and_show_calls_in_their_own_format(tmp_path, shape, fmt, offered, call, result) -> None:
    """Each family's template places the offered tools, the assistant's call and the tool's result
    where that family's checkpoints do; the call format parsed is the one its template teaches."""
    from deployments.config import ShardserveArgs
    from deployments.replica.checkpoint import ServedCheckpoint
    from deployments.types import ChatMessage
    from parallel.checkpoints.shaped_models import write_shaped_checkpoint

    path = write_shaped_checkpoint(shape, tmp_path / shape)
    checkpoint = ServedCheckpoint.open(path, ShardserveArgs(model=str(path)))
    assert format_of(checkpoint.tokenizer.chat_template) == fmt
    text = checkpoint.render_chat([ChatMessage.model_validate(m) for m in HISTORY], [Tool.model_validate(WEATHER)])
    assert offered in text and '"description": "The weather in a city"' in text
    assert call in text and result in text and text.index(offered) < text.index(call) < text.index(result)
    assert "Be brief." in text


def test_a_template_without_tools_refuses_them(tmp_path) -> None:
    """Llama 3.0's and Gemma 3's templates never show tools to the model: offering them is a 400,
    not a request answered as if the model had seen them."""
    from deployments.config import ShardserveArgs
    from deployments.errors import InvalidRequest
    from deployments.replica.checkpoint import ServedCheckpoint
    from deployments.types import ChatMessage
    from parallel.checkpoints.shaped_models import write_shaped_checkpoint

    path = write_shaped_checkpoint("llama-3-8b-instruct", tmp_path / "llama3")
    checkpoint = ServedCheckpoint.open(path, ShardserveArgs(model=str(path)))
    with pytest.raises(InvalidRequest) as refused:
        checkpoint.render_chat([ChatMessage.model_validate(m) for m in ASK], [Tool.model_validate(WEATHER)])
    assert (refused.value.param, refused.value.code, refused.value.status_code) == ("tools", "tools_not_supported", 400)
    assert checkpoint.render_chat([ChatMessage.model_validate(m) for m in ASK]).endswith("assistant<|end_header_id|>\n\n")
