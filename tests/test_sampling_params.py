"""The sampling fields are declared once (deployments/sampling.py): every route and the Python
handle's type take them with the same bounds, and defaults resolve once, in order: the request,
the checkpoint's generation_config.json, OpenAI's neutral values. No Ray."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from deployments.api.openai_models import ChatCompletionRequest, CompletionRequest
from deployments.api.responses_routes import ResponsesRequest
from deployments.api.tfserving_routes import PredictParameters
from deployments.sampling import SamplingDefaults, SamplingParams
from deployments.types import GenerateRequest
from parallel.runner import SamplingSpec

BODIES: list[type[BaseModel]] = [GenerateRequest, CompletionRequest, ChatCompletionRequest]


def bound(model: type[BaseModel], name: str) -> dict:
    """A field's JSON schema without its default: its type and bounds."""
    schema = dict(model.model_json_schema(mode="validation")["properties"][name])
    schema.pop("default", None)
    schema.pop("title", None)
    return schema


@pytest.mark.parametrize("body", BODIES, ids=lambda b: b.__name__)
def test_every_body_takes_every_sampling_field_as_declared(body: type[BaseModel]) -> None:
    assert issubclass(body, SamplingParams)
    for name in SamplingParams.model_fields:
        assert bound(body, name) == bound(SamplingParams, name), name


@pytest.mark.parametrize("body", [ResponsesRequest, PredictParameters], ids=lambda b: b.__name__)
def test_routes_that_take_some_fields_take_them_with_the_same_bounds(body: type[BaseModel]) -> None:
    shared = [name for name in body.model_fields if name in SamplingParams.model_fields]
    assert {"temperature", "top_p"} <= set(shared)
    for name in shared:  # a route that keeps its own default on purpose may make a field non-null
        assert not_null(bound(body, name)) == not_null(bound(SamplingParams, name)), name


def not_null(schema: dict) -> dict:
    options = [s for s in schema.get("anyOf", [schema]) if s != {"type": "null"}]
    return options[0] if len(options) == 1 else {"anyOf": options}


def test_one_message_for_one_bad_value_whatever_the_route() -> None:
    messages = set()
    for body, extra in [(GenerateRequest, {"prompt": "x"}), (CompletionRequest, {"prompt": "x"}),
                        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}]}),
                        (ResponsesRequest, {"input": "x"}), (PredictParameters, {})]:  # fmt: skip
        with pytest.raises(ValidationError) as refused:
            body.model_validate({**extra, "temperature": 2.5})
        (error,) = refused.value.errors()
        messages.add((error["loc"], error["msg"]))
    assert messages == {(("temperature",), "Input should be less than or equal to 2")}


def test_defaults_resolve_in_order_request_then_checkpoint_then_openai() -> None:
    checkpoint = SamplingDefaults(temperature=0.6, top_k=20, top_p=0.9)
    request = GenerateRequest(prompt="x", top_k=5, presence_penalty=None, stop="END", logit_bias={3: 1.0})
    spec = request.with_defaults(checkpoint).sampling_spec(logprobs=2)
    assert spec == SamplingSpec(temperature=0.6, top_p=0.9, top_k=5, min_p=0.0, repetition_penalty=1.0,
                                logit_bias=((3, 1.0),), logprobs=2)  # fmt: skip
    assert request.stop == ["END"] and request.stop_token_ids == []
    assert GenerateRequest(prompt="x").with_defaults(SamplingDefaults()).sampling_spec(None) == SamplingSpec(temperature=1.0)
    assert GenerateRequest(prompt="x", top_k=-1, temperature=0).with_defaults(checkpoint).sampling_spec(None).top_k == 0


def test_an_unresolved_request_is_not_sampled() -> None:
    with pytest.raises(ValueError, match="resolve the sampling defaults first"):
        GenerateRequest(prompt="x").sampling_spec(None)


def test_openai_bodies_hand_every_sampling_field_on() -> None:
    body = CompletionRequest(prompt="x", temperature=0.3, min_p=0.1, frequency_penalty=1.0, stop_token_ids=[7], n=2, seed=4)
    (request,) = body.to_generate_requests()
    assert request.sampling_fields() == body.sampling_fields()
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], repetition_penalty=1.2, stop=["a", "b"])
    assert chat.to_generate_request().sampling_fields() == chat.sampling_fields()
