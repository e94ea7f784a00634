"""The bench's short, non-streaming calls: a chat completion and an embedding, built once.

As with the streams (`bench.sse`), the upstream and the load generator derive the same bytes
from the same few parameters, so the load generator checks every answer byte for byte. A
call's request carries a `bench` field (`{"words": N}` for chat, `{"dims": N}` for
embeddings) that a gateway passes through untouched; the answer carries a `usage`, as
OpenAI's does, so an accounting gateway reads the tokens instead of counting them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from bench.sse import _WORDS, MODEL

CallKind = Literal["chat", "embeddings"]
PATHS: dict[CallKind, str] = {"chat": "/v1/chat/completions", "embeddings": "/v1/embeddings"}
PROMPT = "Tell me about the quick brown fox."
#: an embeddings input the size of a short passage (about 200 bytes, 40 tokens)
PASSAGE = " ".join(["The quick brown fox jumps over the lazy dog."] * 4)
PROMPT_TOKENS = {"chat": 14, "embeddings": 40}


@dataclass(frozen=True, slots=True)
class CallSpec:
    """One kind of short call: a chat answer of `size` words, or a vector of `size` floats."""

    kind: CallKind
    size: int

    @property
    def path(self) -> str:
        return PATHS[self.kind]


DEFAULT_SIZE: dict[CallKind, int] = {"chat": 16, "embeddings": 64}


@functools.cache
def request_body(spec: CallSpec) -> bytes:
    """The request a load generator sends, as the `openai` SDK would (no `stream` field)."""
    if spec.kind == "chat":
        return orjson.dumps(
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": PROMPT}],
                "bench": {"words": spec.size},
            }
        )
    return orjson.dumps({"model": MODEL, "input": PASSAGE, "bench": {"dims": spec.size}})


@functools.cache
def answer_body(spec: CallSpec) -> bytes:
    """The JSON answer the upstream sends for `spec`, OpenAI-shaped, with its `usage`."""
    prompt = PROMPT_TOKENS[spec.kind]
    if spec.kind == "chat":
        content = "".join(_WORDS[i % len(_WORDS)] for i in range(spec.size)).lstrip()
        return orjson.dumps(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion",
                "created": 1700000000,
                "model": MODEL,
                "system_fingerprint": "fp_bench",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": _usage(prompt, spec.size),
            }
        )
    vector = [round(math.sin(i + 1), 6) for i in range(spec.size)]
    return orjson.dumps(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": vector}],
            "model": MODEL,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }
    )


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


@functools.cache
def answer(spec: CallSpec) -> bytes:
    """The whole HTTP/1.1 answer, head and body, for one `transport.write`."""
    body = answer_body(spec)
    head = (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def call_for(path: str, body: bytes) -> CallSpec | None:
    """The call a request asks for, or None when it asks for a stream (or is no call).

    Embeddings are always a call; a chat completion is one unless it says `"stream": true`.
    """
    if path.endswith("/embeddings"):
        kind: CallKind = "embeddings"
    elif path.endswith("/chat/completions"):
        kind = "chat"
    else:
        return None
    doc: dict[str, Any] = orjson.loads(body)
    if kind == "chat" and doc.get("stream") is True:
        return None
    params = doc.get("bench") or {}
    size = params.get("words" if kind == "chat" else "dims", DEFAULT_SIZE[kind])
    return CallSpec(kind, int(size))
