"""TensorFlow-Serving-style REST routes, for the clients built against TF Serving.

    GET  /v1/models/{name}[/versions/{v}|/labels/{l}]            model version status
    GET  /v1/models/{name}[/versions/{v}|/labels/{l}]/metadata   model metadata
    POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict    generate

The row format (`instances`) answers `predictions`, the columnar format (`inputs`) answers
`outputs`, as TF Serving does. Errors are `{"error": "..."}`. The plain status route also carries
OpenAI's model fields (`id`, `object`, ...), since `GET /v1/models/{name}` is both APIs' route.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from deployments.api.cache_control import mark_cache_status, with_cache_control
from deployments.api.openai_routes import Backend, model_object
from deployments.errors import InvalidRequest, ModelNotFound
from deployments.sampling import MaxTokens, StopStrings, Temperature, TopK, TopP
from deployments.types import GenerateRequest, GenerateResponse, ModelCard


class PredictParameters(BaseModel):
    """Generation settings for :predict (an extension: TF Serving has no such thing)."""

    model_config = ConfigDict(extra="forbid")

    # The sampling fields' types and bounds are deployments.sampling's; the defaults differ on
    # purpose: greedy and 16 tokens unless asked, so that a predict is reproducible and short
    # (a TF-Serving client expects the same output for the same input). top_p and top_k left
    # out take the model's defaults, as on every route.
    max_tokens: MaxTokens = 16
    temperature: Temperature = 0.0
    top_p: TopP | None = None
    top_k: TopK | None = None
    seed: int | None = None
    stop: StopStrings = Field(default_factory=list)
    cache: bool = True
    """False: not answered from, nor stored in, the result cache."""


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    signature_name: str | None = None
    instances: list[str | dict[str, Any]] | None = None
    inputs: str | list[str] | dict[str, Any] | None = None
    parameters: PredictParameters = PredictParameters()

    def texts(self) -> tuple[list[str], str]:
        """The prompts and the response key (`predictions` or `outputs`)."""
        if (self.instances is None) == (self.inputs is None):
            raise InvalidRequest("give exactly one of 'instances' or 'inputs'")
        if self.instances is not None:
            texts = [i if isinstance(i, str) else _text_field(i) for i in self.instances]
            key = "predictions"
        else:
            raw = self.inputs["text"] if isinstance(self.inputs, dict) and "text" in self.inputs else self.inputs
            texts = [raw] if isinstance(raw, str) else raw  # type: ignore[assignment]
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise InvalidRequest("'inputs' must be a string, a list of strings, or {\"text\": ...}")
            key = "outputs"
        if not texts:
            raise InvalidRequest("no instances given")
        if any(not t for t in texts):
            raise InvalidRequest("instance text must not be empty")
        return texts, key


def _text_field(instance: dict[str, Any]) -> str:
    text = instance.get("text", instance.get("prompt"))
    if not isinstance(text, str):
        raise InvalidRequest("each instance needs a string field 'text'")
    return text


def _status(card: ModelCard) -> dict[str, Any]:
    return {
        "model_version_status": [
            {
                "version": str(card.version),
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }


def register(app: FastAPI, backend: Backend) -> None:
    async def card_for(name: str, version: str | None, label: str | None) -> ModelCard:
        if name != backend.model_name:
            raise ModelNotFound(f"Servable not found for request: Latest({name})")
        return await backend.model_card(backend.resolve_version(version, label))

    async def predict(
        name: str, version: str | None, label: str | None, body: PredictRequest, raw: Request, response: Response
    ) -> dict[str, Any]:
        card = await card_for(name, version, label)
        texts, key = body.texts()
        if len(texts) > backend.max_prompts:
            raise InvalidRequest(f"at most {backend.max_prompts} instances per request")
        params = body.parameters.model_dump()
        requests = with_cache_control([GenerateRequest(prompt=t, **params) for t in texts], raw)
        responses: list[GenerateResponse] = await asyncio.gather(*(backend.generate(r, card.version) for r in requests))
        mark_cache_status(response, responses)
        predictions = [
            {
                "text": r.outputs[0].text,
                "prompt_tokens": r.usage.prompt_tokens,
                "completion_tokens": r.usage.completion_tokens,
                "finish_reason": r.outputs[0].finish_reason,
            }
            for r in responses
        ]
        return {key: predictions, "model_spec": {"name": name, "version": str(card.version)}}

    async def metadata(name: str, version: str | None, label: str | None) -> dict[str, Any]:
        card = await card_for(name, version, label)
        return {
            "model_spec": {"name": name, "signature_name": "", "version": str(card.version)},
            "metadata": {
                "signature_def": {
                    "signature_def": {
                        "serving_default": {
                            "inputs": {
                                "text": {
                                    "dtype": "DT_STRING",
                                    "tensor_shape": {"dim": [{"size": "-1"}]},
                                    "name": "text",
                                }
                            },
                            "outputs": {
                                "text": {
                                    "dtype": "DT_STRING",
                                    "tensor_shape": {"dim": [{"size": "-1"}]},
                                    "name": "text",
                                }
                            },
                            "method_name": "tensorflow/serving/predict",
                        }
                    }
                },
                "model": {
                    "source": card.source,
                    "max_model_len": card.max_model_len,
                    "vocab_size": card.vocab_size,
                    "num_parameters": card.num_parameters,
                    "weight_bytes": card.weight_bytes,
                    "dtype": card.dtype,
                    "attention_backend": card.attention_backend,
                    "fused_ops": card.fused_ops,
                    "quality": card.quality,
                },
            },
        }

    @app.get("/v1/models/{name}")
    async def model_status(name: str) -> dict[str, Any]:
        """Every served version with its state (and OpenAI's fields for the newest)."""
        card = await card_for(name, None, None)
        statuses = [_status(await backend.model_card(v))["model_version_status"][0] for v in reversed(backend.versions)]
        return {**model_object(card), "model_version_status": statuses}

    @app.get("/v1/models/{name}/versions/{version}")
    async def model_version_status(name: str, version: str) -> dict[str, Any]:
        return _status(await card_for(name, version, None))

    @app.get("/v1/models/{name}/labels/{label}")
    async def model_label_status(name: str, label: str) -> dict[str, Any]:
        return _status(await card_for(name, None, label))

    @app.get("/v1/models/{name}/metadata")
    async def model_metadata(name: str) -> dict[str, Any]:
        return await metadata(name, None, None)

    @app.get("/v1/models/{name}/versions/{version}/metadata")
    async def model_version_metadata(name: str, version: str) -> dict[str, Any]:
        return await metadata(name, version, None)

    @app.post("/v1/models/{name}:predict")
    async def model_predict(name: str, body: PredictRequest, raw: Request, response: Response) -> dict[str, Any]:
        return await predict(name, None, None, body, raw, response)

    @app.post("/v1/models/{name}/versions/{version}:predict")
    async def model_version_predict(
        name: str, version: str, body: PredictRequest, raw: Request, response: Response
    ) -> dict[str, Any]:
        return await predict(name, version, None, body, raw, response)

    @app.post("/v1/models/{name}/labels/{label}:predict")
    async def model_label_predict(
        name: str, label: str, body: PredictRequest, raw: Request, response: Response
    ) -> dict[str, Any]:
        return await predict(name, None, label, body, raw, response)
