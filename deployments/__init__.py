"""shardserve's Ray Serve side. The public surface is small and re-exported here."""

from deployments.config import EngineConfig, LimitsConfig, ShardserveArgs
from deployments.errors import ShardserveError
from deployments.types import (
    ChatMessage,
    CompletionOutput,
    EmbedRequest,
    EmbedResponse,
    GenerateChunk,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    SamplingDefaults,
    StructuredOutput,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
)

__all__ = [
    "ChatMessage",
    "CompletionOutput",
    "EmbedRequest",
    "EmbedResponse",
    "EngineConfig",
    "GenerateChunk",
    "GenerateRequest",
    "GenerateResponse",
    "LimitsConfig",
    "ModelCard",
    "SamplingDefaults",
    "ShardserveArgs",
    "ShardserveError",
    "StructuredOutput",
    "TokenizeRequest",
    "TokenizeResponse",
    "Usage",
]
