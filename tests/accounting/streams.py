"""Real-shaped SSE bodies, as upstreams write them, and helpers to build chat chunks."""

from __future__ import annotations

from typing import Any

import orjson


def chunk(*choices: dict[str, Any], usage: dict[str, Any] | None = None, **extra: Any) -> bytes:
    """One `data:` event of a chat completion stream, as OpenAI frames it."""
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4o",
        "choices": list(choices),
        **extra,
    }
    if usage is not None:
        body["usage"] = usage
    return b"data: " + orjson.dumps(body) + b"\n\n"


def delta(index: int = 0, finish_reason: str | None = None, **fields: Any) -> dict[str, Any]:
    """A streamed choice whose `delta` holds `fields` (content, reasoning_content, ...)."""
    return {"index": index, "delta": fields, "finish_reason": finish_reason}


DONE = b"data: [DONE]\n\n"

OPENAI_CHAT = (
    chunk(delta(role="assistant", content=""))
    + chunk(delta(content="Hello"))
    + chunk(delta(content=" wörld ☃"))
    + chunk(delta(finish_reason="stop"))
    + chunk(usage={"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12})
    + DONE
)

# vLLM / DeepSeek style: reasoning in its own field, CRLF line ends, a keep-alive comment.
VLLM_REASONING = (
    b": ping\r\n\r\n"
    + chunk(delta(reasoning_content="Let me think.")).replace(b"\n", b"\r\n")
    + chunk(delta(content="42", finish_reason="stop")).replace(b"\n", b"\r\n")
    + DONE.replace(b"\n", b"\r\n")
)

# Every field the spec knows, CR-only line ends, multi-line data and an error event.
SPEC_FIELDS = (
    b"retry: 3000\r: comment\revent: message\rid: 41\rdata: first line\rdata: second\r\r"
    b'event: error\rid: 42\rdata: {"error": {"message": "overloaded", "code": 529}}\r\r'
    b"data:no-space\rdata:  two spaces\rfield-without-colon\r\r"
)

# An upstream that ends the body without the final blank line.
NO_FINAL_NEWLINE = chunk(delta(content="<think>hm</think>ok")) + b"data: [DONE]"

CORPUS = {
    "openai_chat": OPENAI_CHAT,
    "vllm_reasoning": VLLM_REASONING,
    "spec_fields": SPEC_FIELDS,
    "no_final_newline": NO_FINAL_NEWLINE,
    "bom_start": b"\xef\xbb\xbfdata: after a BOM\n\n" + DONE,
}
