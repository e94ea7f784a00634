"""A client's request, read and parsed: the path checked, the body read within its bounds, the
JSON parsed once.

    check the path (400 invalid_path) -> read the body (413 too large, 408 too slow, 400 a bad
      Content-Encoding) -> parse the JSON (400) -> the model named (400 without one)
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from .aiohttp_private import park_buffer
from .errors import BadRequest, RequestTooLarge

#: endpoints whose body must be a JSON object naming a model
MODEL_ENDPOINTS = frozenset({"chat/completions", "completions", "embeddings", "responses"})
#: a `.` or `..` path segment, or a control character
_UNSAFE_TAIL = re.compile(r"(?:^|/)\.\.?(?:/|$)|[\x00-\x1f\x7f]")


@dataclass(slots=True)
class ParsedRequest:
    tail: str
    body: bytes
    doc: dict[str, Any] | None
    model: str | None
    stream: bool

    def release(self) -> None:
        """Drop the body and its parse once the upstream request is built: a stream that
        lasts minutes holds no copy of its prompt."""
        self.body, self.doc = b"", None


async def parse_request(
    request: web.Request, max_bytes: int, timeout_s: float | None = None
) -> ParsedRequest:
    tail = check_tail(request.match_info.get("tail", ""))
    body = await read_body(request, max_bytes, timeout_s)
    doc = parse_json(body, required=tail in MODEL_ENDPOINTS and request.method == "POST")
    model = doc.get("model") if doc is not None else None
    if doc is not None and tail in MODEL_ENDPOINTS and not isinstance(model, str):
        raise BadRequest("You must provide a model parameter.", param="model")
    stream = doc is not None and doc.get("stream") is True
    return ParsedRequest(tail, body, doc, model if isinstance(model, str) else None, stream)


def check_tail(tail: str) -> str:
    """The path after `/v1/`, refused (400) when it could leave the upstream's base path.

    `tail` is already percent-decoded: `%2e%2e` is `..` here. Dot segments would climb out of
    the base URL's path once the upstream normalises them, and control characters have no
    business in a path; everything else is percent-encoded again by `UpstreamClient.target_for`.
    """
    if _UNSAFE_TAIL.search(tail):
        raise BadRequest(f"Invalid path: /v1/{tail!r}", code="invalid_path")
    return tail


async def read_body(request: web.Request, max_bytes: int, timeout_s: float | None = None) -> bytes:
    """The whole body, at most max_bytes (413), within timeout_s (408: a slowloris body).

    An answer to a body left unread or unreadable closes the connection (app.py,
    `_close_if_body_unread`): it cannot carry another request."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    content = request.content
    try:
        while piece := content.read_nowait():  # what has arrived already needs no timer
            _append(body, piece, max_bytes)
        if not content.at_eof():
            async with asyncio.timeout(timeout_s):
                while piece := await content.readany():
                    _append(body, piece, max_bytes)
    except TimeoutError:
        raise BadRequest(
            f"The request body did not arrive within {timeout_s} s.",
            code="request_timeout",
            status=408,
        ) from None
    except web.RequestPayloadError:  # a body that does not match its Content-Encoding
        encoding = request.headers.get("Content-Encoding", "identity")
        raise BadRequest(
            f"The request body could not be decoded (Content-Encoding: {encoding!r}).",
            code="invalid_request_body",
        ) from None
    park_buffer(content)  # read to its end: its buffer is not needed for the stream's life
    return bytes(body)


def _append(body: bytearray, piece: bytes, max_bytes: int) -> None:
    body += piece
    if len(body) > max_bytes:
        raise _too_large(max_bytes)


def _too_large(max_bytes: int) -> RequestTooLarge:
    return RequestTooLarge(f"The request body is larger than the limit of {max_bytes} bytes.")


def parse_json(body: bytes, *, required: bool) -> dict[str, Any] | None:
    if not body:
        if required:
            raise BadRequest("The request body is empty; send a JSON object.")
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if not required:
            return None
        raise BadRequest(f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(doc, dict):
        if required:
            raise BadRequest("The request body must be a JSON object.")
        return None
    return doc
