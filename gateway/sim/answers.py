"""Whole (non-streamed) answers, usage and the small endpoints: embeddings, models.

Usage follows one rule, streamed or not: `completion_tokens` is the sum of the o200k_base
token counts of each chunk (content plus reasoning, `<think>` and `</think>` included), summed
over the choices, which is exactly what the gateway's meter counts with its default tokenizer
(it counts per chunk too). `prompt_tokens` is the gateway's own prompt estimate
(`gateway.tokens.estimate_prompt_tokens`) with the same tokenizer, so a `sim-*` route shows no
drift between its live count and the simulator's usage.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from typing import Any

from .events import Kind
from .steering import Plan

MODELS_CREATED = 1_700_000_000

EMBEDDING_DIMENSIONS = 8


def usage(
    prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if reasoning_tokens is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return out


def plan_usage(plan: Plan, prompt_tokens: int, n: int) -> dict[str, Any]:
    """The usage of a whole answer to `plan` with `n` choices."""
    reasoning = plan.reasoning.total
    return usage(
        prompt_tokens,
        n * (plan.content.total + reasoning + plan.arguments.total),
        n * reasoning if plan.reasoning.text else None,
    )


def whole_answer(
    kind: Kind,
    plan: Plan,
    *,
    response_id: str,
    created: int,
    model: Any,
    n: int,
    prompt_tokens: int,
) -> dict[str, Any]:
    """The `chat.completion` or `text_completion` object for a non-streamed request."""
    content, reasoning = plan.content.joined(), plan.reasoning.joined()
    if plan.think:
        content, reasoning = reasoning + content, ""
    choice: dict[str, Any]
    if kind == "text":
        choice = {"text": content, "logprobs": None}
    else:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning:
            message["reasoning_content"] = reasoning
        if plan.tool_name is not None:
            message["content"] = content or None
            function = {"name": plan.tool_name, "arguments": plan.arguments.joined()}
            call_id = "call_" + response_id.rpartition("-")[2]
            message["tool_calls"] = [{"id": call_id, "type": "function", "function": function}]
        choice = {"message": message, "logprobs": None}
    return {
        "id": response_id,
        "object": "text_completion" if kind == "text" else "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": i, **choice, "finish_reason": plan.finish_reason} for i in range(n)],
        "usage": plan_usage(plan, prompt_tokens, n),
    }


def embeddings(body: dict[str, Any], tokens: int) -> dict[str, Any]:
    """A deterministic embedding per input (same input, same vector), with usage."""
    inputs = body.get("input")
    items = inputs if isinstance(inputs, list) and not _is_token_ids(inputs) else [inputs]
    dimensions = body.get("dimensions")
    if not isinstance(dimensions, int) or dimensions < 1:
        dimensions = EMBEDDING_DIMENSIONS
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, item in enumerate(items):
        vector = _vector(repr(item).encode(), dimensions)
        encoded: Any = (
            base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            if as_base64
            else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {
        "object": "list",
        "data": data,
        "model": body.get("model"),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _is_token_ids(value: list[Any]) -> bool:
    return bool(value) and all(isinstance(v, int) for v in value)


def _vector(seed: bytes, dimensions: int) -> list[float]:
    raw = b"".join(
        hashlib.sha256(seed + block.to_bytes(4, "little")).digest()
        for block in range(math.ceil(dimensions / 8))
    )
    values = [v / 2**31 - 1 for v in struct.unpack(f"<{dimensions}I", raw[: 4 * dimensions])]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    # float32 values, as a model computes them: the float and base64 answers then agree exactly
    packed = struct.pack(f"<{dimensions}f", *(v / norm for v in values))
    return list(struct.unpack(f"<{dimensions}f", packed))


def model_list(models: tuple[str, ...]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": MODELS_CREATED, "owned_by": "gateway-sim"}
            for m in models
        ],
    }
