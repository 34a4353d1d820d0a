"""The errors a request can end with, each carrying its HTTP status and OpenAI error type.

Raised anywhere (ingress, LLM server, engine) and mapped to a response once, at the HTTP edge.
They cross Ray's process boundary, so pickling keeps every field.
"""

from __future__ import annotations

from typing import Any


class ShardserveError(Exception):
    status_code: int = 500
    error_type: str = "internal_error"

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.param, self.code, self.retry_after_s))

    def to_openai(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class Unauthorized(ShardserveError):
    status_code = 401
    error_type = "invalid_request_error"


class RateLimited(ShardserveError):
    status_code = 429
    error_type = "rate_limit_error"


class InvalidRequest(ShardserveError):
    status_code = 400
    error_type = "invalid_request_error"


class ModelNotFound(ShardserveError):
    status_code = 404
    error_type = "invalid_request_error"

    def __init__(
        self,
        message: str,
        param: str | None = "model",
        code: str | None = "model_not_found",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, param, code, retry_after_s)


class RequestTooLarge(ShardserveError):
    status_code = 413
    error_type = "invalid_request_error"


class Overloaded(ShardserveError):
    status_code = 503
    error_type = "overloaded_error"


class RequestTimeout(ShardserveError):
    status_code = 504
    error_type = "timeout_error"


class EngineFault(ShardserveError):
    status_code = 500
    error_type = "internal_error"
