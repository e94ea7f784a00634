"""The bytes of OpenAI's streaming events, pre-serialised per response.

Every chunk of one response shares its envelope (`id`, `object`, `created`, `model`, and
`"usage":null` when the client asked for usage); only the choice changes. `ChunkEncoder`
serialises the envelope once and builds each event by concatenating bytes, so the streaming
loop never walks a dict. The result is exactly what `orjson.dumps` gives for the same object:

    data: {"id":"chatcmpl-sim1","object":"chat.completion.chunk","created":1700000000,
           "model":"sim-small","choices":[{"index":0,"delta":{"content":" quick"},
           "finish_reason":null}]}\\n\\n

Chat choices carry `delta` (`role` first, then `content` or `reasoning_content`, then a tool
call's `tool_calls` pieces, then `{}` with the finish reason); plain completions
(`object: "text_completion"`) carry `text` and `logprobs`.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson

Kind = Literal["chat", "text", "responses"]

DONE = b"data: [DONE]\n\n"


class ChunkEncoder:
    """Builds the SSE events of one streamed response."""

    __slots__ = ("_close", "_open", "_text", "kind", "response_id")

    def __init__(
        self, kind: Kind, *, response_id: str, created: int, model: object, include_usage: bool
    ) -> None:
        self.kind = kind
        self.response_id = response_id
        self._text = kind == "text"
        obj = b"text_completion" if self._text else b"chat.completion.chunk"
        self._open = b"".join((
            b'data: {"id":', orjson.dumps(response_id), b',"object":"', obj, b'","created":',
            str(created).encode(), b',"model":', orjson.dumps(model), b',"choices":[',
        ))  # fmt: skip
        self._close = b"]" + (b',"usage":null' if include_usage else b"") + b"}\n\n"

    def role(self, index: int) -> bytes:
        """The first chat event of a choice (plain completions have none)."""
        return self._choice(
            index, b'"delta":{"role":"assistant","content":""},"finish_reason":null'
        )

    def content(self, index: int, piece: bytes) -> bytes:
        """A content chunk; `piece` is the JSON-encoded string."""
        if self._text:
            return self._choice(
                index, b'"text":' + piece + b',"logprobs":null,"finish_reason":null'
            )
        return self._choice(index, b'"delta":{"content":' + piece + b'},"finish_reason":null')

    def reasoning(self, index: int, piece: bytes) -> bytes:
        """A `delta.reasoning_content` chunk (chat only)."""
        return self._choice(
            index, b'"delta":{"reasoning_content":' + piece + b'},"finish_reason":null'
        )

    def tool_call(self, index: int, call_id: bytes, name: bytes) -> bytes:
        """A chat choice's first tool-call chunk: the call's id and function name (JSON)."""
        return self._choice(
            index,
            b'"delta":{"tool_calls":[{"index":0,"id":' + call_id + b',"type":"function",'
            b'"function":{"name":' + name + b',"arguments":""}}]},"finish_reason":null',
        )

    def arguments(self, index: int, piece: bytes) -> bytes:
        """A piece of the tool call's arguments (chat only); `piece` is the JSON string."""
        return self._choice(
            index,
            b'"delta":{"tool_calls":[{"index":0,"function":{"arguments":' + piece + b"}}]},"
            b'"finish_reason":null',
        )

    def finish(self, index: int, reason: bytes) -> bytes:
        """The last event of a choice; `reason` is the JSON-encoded finish reason."""
        if self._text:
            return self._choice(index, b'"text":"","logprobs":null,"finish_reason":' + reason)
        return self._choice(index, b'"delta":{},"finish_reason":' + reason)

    def usage(self, usage: dict[str, Any]) -> bytes:
        """The usage-only event OpenAI sends before `[DONE]` when `include_usage` is set."""
        return self._open + b'],"usage":' + orjson.dumps(usage) + b"}\n\n"

    def _choice(self, index: int, body: bytes) -> bytes:
        return b"".join(
            (self._open, b'{"index":', str(index).encode(), b",", body, b"}", self._close)
        )


def error_event(message: str, code: str) -> bytes:
    """The one `data: {"error": ...}` event that ends a stream, as OpenAI sends it."""
    return b"data: " + orjson.dumps(error_body(message, "server_error", code)) + b"\n\n"


def error_body(
    message: str, type_: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
