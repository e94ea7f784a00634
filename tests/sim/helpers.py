"""Reading the simulator's answers in tests."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.tokens import estimate_prompt_tokens, load_tokenizer


def sse_data(raw: bytes) -> list[bytes]:
    """The `data:` payloads of an SSE body, in order; the body must frame cleanly."""
    assert raw.endswith(b"\n\n"), raw[-40:]
    events = raw[:-2].split(b"\n\n")
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events), events
    return [e[len(b"data: ") :] for e in events]


def sse_json(raw: bytes) -> list[dict[str, Any]]:
    """The JSON events of an SSE body that must end with `data: [DONE]`."""
    data = sse_data(raw)
    assert data[-1] == b"[DONE]"
    return [orjson.loads(d) for d in data[:-1]]


def chat(**fields: Any) -> dict[str, Any]:
    """A chat request body for the simulator."""
    body: dict[str, Any] = {"model": "sim-small", "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    return body


#: a function call the simulator is steered to end in (`tool_call`)
TOOL = {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}


def o200k(text: str) -> int:
    """The gateway's count of `text` with its default tokenizer (loaded by the simulator)."""
    return load_tokenizer("o200k_base").count(text)


def gateway_prompt(body: dict[str, Any]) -> int:
    """The gateway's prompt estimate of a request body, with its default tokenizer."""
    return estimate_prompt_tokens(body, load_tokenizer("o200k_base"))
