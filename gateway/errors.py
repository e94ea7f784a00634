"""The gateway's exception tree, and its one mapping to OpenAI-shaped errors.

    GatewayError                      any error the client is told about
    ├── BadRequest                    400 invalid_request_error (malformed JSON, no model...)
    ├── Unauthorized                  401 invalid_api_key
    ├── ModelNotFound                 404 model_not_found
    ├── RequestTooLarge               413 request_too_large
    ├── RateLimitExceeded             429 rate_limit_exceeded (+ Retry-After, x-ratelimit-*)
    ├── QuotaExceeded                 429 insufficient_quota: a budget of this period is spent
                                      (+ Retry-After until it resets, x-should-retry: false)
    ├── UpstreamError                 502 upstream_error: unreachable, reset, bad answer
    ├── ServiceUnavailable            503 (pool or queue exhausted, draining, limits backend down)
    └── UpstreamTimeout               504 upstream_timeout

Before a stream starts, `error_response` turns any of these into `{"error": {"message", "type",
"param", "code"}}` with its status. Once a stream has started, `stream_error_event` gives the
one event that ends it, so SDK clients raise instead of returning half an answer: chat's
`data: {"error": ...}`, or on a Responses API stream an `event: error` in that API's shape.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"
    #: which label of gateway_upstream_errors_total this error counts under, when it is one
    reason: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        code: str | None = None,
        reason: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = dict(headers or {})
        if code is not None:
            self.code = code
        if reason is not None:
            self.reason = reason
        if status is not None:
            self.status = status

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequest(GatewayError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class Unauthorized(GatewayError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class ModelNotFound(GatewayError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class RequestTooLarge(GatewayError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class RateLimitExceeded(GatewayError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class QuotaExceeded(GatewayError):
    status, type, code = 429, "insufficient_quota", "insufficient_quota"


class UpstreamError(GatewayError):
    status, type, code, reason = 502, "upstream_error", "upstream_error", "connect"


class ServiceUnavailable(GatewayError):
    status, type, code = 503, "server_error", "service_unavailable"


class UpstreamTimeout(GatewayError):
    status, type, code, reason = 504, "timeout_error", "upstream_timeout", "timeout"


def drop_tracebacks(exc: BaseException) -> None:
    """`exc` is handled (turned into an answer or a result): let go of the frames its chain
    holds.

    A traceback holds the frames the exception went through; when one of them also holds the
    exception (a local it was raised from, an answer that keeps its error), that is a
    reference cycle only the garbage collector could break, and it keeps the request's
    objects with it.
    """
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in chain:
        chain.append(link)
        link.__traceback__ = None
        link = link.__cause__ or link.__context__


def error_response(error: GatewayError) -> web.Response:
    return web.Response(
        status=error.status,
        body=orjson.dumps(error.body()),
        content_type="application/json",
        headers=error.headers,
    )


def sse_error_event(error: GatewayError) -> bytes:
    return b"data: " + orjson.dumps(error.body()) + b"\n\n"


def responses_error_event(error: GatewayError, sequence_number: int) -> bytes:
    """The event that ends a Responses API stream the gateway has to cut.

    It is the API's own `error` event (`type`, `code`, `message`, `param`,
    `sequence_number`, after an `event: error` line), and it carries the `error` object of
    `error_response` as well: openai-python's `Stream` raises `APIError` on any event whose
    JSON has a truthy `error` (it does not raise on a bare `type: error` event, nor on
    `response.failed`); openai-node's `Stream` raises on an `event: error` (with `data.error`
    and `data.message`) and on any `response.*` or unnamed event with a truthy `data.error`.
    """
    body = error.body()
    event = {
        "type": "error",
        "code": error.code,
        "message": error.message,
        "param": error.param,
        "sequence_number": sequence_number,
        **body,
    }
    return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"


def stream_error_event(error: GatewayError, responses: bool, sequence_number: int = 0) -> bytes:
    """The error event that ends a stream: the one place its shape follows the endpoint."""
    return responses_error_event(error, sequence_number) if responses else sse_error_event(error)
