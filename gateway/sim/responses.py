"""The Responses API (`POST /v1/responses`): its streamed events and its response object.

A streamed response, as OpenAI sends it: each event is `event: <type>` then `data: {json}`, the
JSON's `type` repeats the event name and `sequence_number` counts from 0; no `[DONE]`.

    response.created, response.in_progress               (the response, status "in_progress")
    reasoning (`reasoning_chunks`)  output_item.added, reasoning_summary_part.added,
        reasoning_summary_text.delta x N, reasoning_summary_text.done,
        reasoning_summary_part.done, output_item.done
    message (unless a tool call and no text)  output_item.added, content_part.added,
        output_text.delta x N, output_text.done, content_part.done, output_item.done
    function call (`tool_call`)  output_item.added, function_call_arguments.delta x N,
        function_call_arguments.done, output_item.done
    response.completed | response.incomplete | response.failed   (the whole response again)

Delta events carry `obfuscation`, a padding string as OpenAI adds (it is not output). The
terminal event repeats the request's `instructions` and `tools` and all the output, with
`usage`: tokens counted as the gateway counts them (o200k_base, per delta), the input from the
gateway's own prompt estimate. Items are recorded as their events are written, so a response
cut short by a fault (`incomplete`, `failed`) holds exactly what the client saw.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import time
from collections.abc import Iterator
from typing import Any, Literal

import orjson

from .steering import Pieces, Plan
from .stream import Beat, Ending, Step, Tally

Status = Literal["completed", "incomplete", "failed"]

#: the `obfuscation` padding makes a delta's text and padding this long together (at least 1)
OBFUSCATION_BLOCK = 16


@functools.lru_cache(maxsize=4096)
def obfuscation(piece: bytes) -> bytes:
    """The padding of a delta of JSON string `piece`: letters and digits, deterministic."""
    length = OBFUSCATION_BLOCK - len(piece) % OBFUSCATION_BLOCK or OBFUSCATION_BLOCK
    letters = base64.b64encode(hashlib.sha256(piece).digest(), altchars=b"xy")
    return letters[:length]


def _event(kind: str, seq: int, fields: dict[str, Any]) -> bytes:
    return b"".join((
        b"event: ", kind.encode(), b"\ndata: ",
        orjson.dumps({"type": kind, "sequence_number": seq, **fields}), b"\n\n",
    ))  # fmt: skip


class Draft:
    """One response as written so far: its ids, the request's echoed fields, its output."""

    __slots__ = (
        "arguments",
        "body",
        "call_id",
        "created_at",
        "input_tokens",
        "items",
        "model",
        "plan",
        "reasoning",
        "response_id",
        "text",
    )

    def __init__(
        self, plan: Plan, body: dict[str, Any], *, response_id: str, input_tokens: int
    ) -> None:
        self.plan, self.body, self.response_id = plan, body, response_id
        self.model = body.get("model")
        self.input_tokens = input_tokens
        self.created_at = int(time.time())
        suffix = response_id.removeprefix("resp_")
        self.call_id = "call_" + suffix
        #: the output items in order, by kind; each one's text grows as its deltas are written
        self.items: list[tuple[str, str]] = []
        if plan.reasoning.text:
            self.items.append(("reasoning", "rs_" + suffix))
        if plan.content.text or plan.tool_name is None:
            self.items.append(("message", "msg_" + suffix))
        if plan.tool_name is not None:
            self.items.append(("function_call", "fc_" + suffix))
        self.reasoning: list[str] = []
        self.text: list[str] = []
        self.arguments: list[str] = []

    def response(self, status: str, usage: dict[str, Any] | None) -> dict[str, Any]:
        """The response object; its output holds the items opened so far."""
        body = self.body
        error = incomplete = None
        if status == "failed":
            error = {"code": "server_error", "message": "sim: injected response.failed"}
        elif status == "incomplete":
            incomplete = {"reason": "max_output_tokens"}
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": self.model,
            "output": self._output(status),
            "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "store": body.get("store") is not False,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": body.get("tools") or [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "metadata": body.get("metadata") or {},
        }

    def usage(self, output_tokens: int, reasoning_tokens: int) -> dict[str, Any]:
        cached = min(self.plan.cached_tokens, self.input_tokens)
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cache_write_tokens": 0, "cached_tokens": cached},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": self.input_tokens + output_tokens,
        }

    def item(self, kind: str, item_id: str, status: str) -> dict[str, Any]:
        """One output item as it stands (`status` "in_progress" when it opens: empty)."""
        opening = status == "in_progress"
        if kind == "reasoning":
            summary = [] if opening else [self.summary_part()]
            return {"id": item_id, "type": "reasoning", "summary": summary}
        if kind == "message":
            content = [] if opening else [self.text_part()]
            return {
                "id": item_id, "type": "message", "status": status, "role": "assistant",
                "content": content,
            }  # fmt: skip
        return {
            "id": item_id, "type": "function_call", "status": status,
            "arguments": "" if opening else "".join(self.arguments), "call_id": self.call_id,
            "name": self.plan.tool_name,
        }  # fmt: skip

    def summary_part(self) -> dict[str, Any]:
        return {"type": "summary_text", "text": "".join(self.reasoning)}

    def text_part(self) -> dict[str, Any]:
        return {
            "type": "output_text",
            "annotations": [],
            "logprobs": [],
            "text": "".join(self.text),
        }

    def _output(self, status: str) -> list[dict[str, Any]]:
        item_status = "completed" if status == "completed" else "incomplete"
        out = []
        for kind, item_id in self.items:
            if kind == "reasoning" and not self.reasoning:
                continue
            if kind == "function_call" and not self.arguments and status != "completed":
                continue
            if kind == "message" and not self.text and status != "completed":
                continue
            out.append(self.item(kind, item_id, item_status))
        return out


class ResponseShape:
    """The events of one streamed response (see the module's docstring), numbered in order."""

    __slots__ = ("draft", "last", "seq")

    def __init__(self, draft: Draft) -> None:
        self.draft = draft
        self.seq = 0
        #: the response the terminal event carried, once it is written
        self.last: dict[str, Any] | None = None

    def _next(self) -> int:
        seq = self.seq
        self.seq += 1
        return seq

    def event(self, kind: str, **fields: Any) -> bytes:
        return _event(kind, self._next(), fields)

    def delta(self, kind: str, where: bytes, piece: bytes, tail: bytes = b"") -> bytes:
        """A delta event, concatenated: `where` locates it (item id, indexes), as JSON members."""
        return b"".join((
            b"event: ", kind.encode(), b'\ndata: {"type":"', kind.encode(),
            b'","sequence_number":', str(self._next()).encode(), b",", where,
            b',"delta":', piece, tail, b',"obfuscation":"', obfuscation(piece), b'"}\n\n',
        ))  # fmt: skip

    def beats(self) -> Iterator[Step]:
        draft = self.draft
        opening = draft.response("in_progress", None)
        yield (
            Beat.FRAME,
            [
                self.event("response.created", response=opening),
                self.event("response.in_progress", response=opening),
            ],
            0,
            0,
        )
        for output_index, (kind, item_id) in enumerate(draft.items):
            if kind == "reasoning":
                yield from self._reasoning(output_index, item_id)
            elif kind == "message":
                yield from self._message(output_index, item_id)
            else:
                yield from self._call(output_index, item_id)
        yield Beat.FINISH, [], 0, 0

    def _added(self, output_index: int, kind: str, item_id: str) -> bytes:
        item = self.draft.item(kind, item_id, "in_progress")
        return self.event("response.output_item.added", output_index=output_index, item=item)

    def _done(self, output_index: int, kind: str, item_id: str) -> bytes:
        item = self.draft.item(kind, item_id, "completed")
        return self.event("response.output_item.done", output_index=output_index, item=item)

    def _reasoning(self, output_index: int, item_id: str) -> Iterator[Step]:
        draft, at = self.draft, {"item_id": item_id, "output_index": output_index}
        empty = {"type": "summary_text", "text": ""}
        yield (
            Beat.FRAME,
            [
                self._added(output_index, "reasoning", item_id),
                self.event(
                    "response.reasoning_summary_part.added", **at, summary_index=0, part=empty
                ),
            ],
            0,
            0,
        )
        where = _where(item_id, output_index, b',"summary_index":0')
        kind = "response.reasoning_summary_text.delta"
        for text, piece, tokens in _zip(draft.plan.reasoning):
            yield Beat.REASONING, [self.delta(kind, where, piece)], tokens, tokens
            draft.reasoning.append(text)
        part = draft.summary_part()
        yield (
            Beat.FRAME,
            [
                self.event(
                    "response.reasoning_summary_text.done", **at, summary_index=0, text=part["text"]
                ),
                self.event(
                    "response.reasoning_summary_part.done", **at, summary_index=0, part=part
                ),
                self._done(output_index, "reasoning", item_id),
            ],
            0,
            0,
        )

    def _message(self, output_index: int, item_id: str) -> Iterator[Step]:
        draft, at = self.draft, {"item_id": item_id, "output_index": output_index}
        empty = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
        yield (
            Beat.FRAME,
            [
                self._added(output_index, "message", item_id),
                self.event("response.content_part.added", **at, content_index=0, part=empty),
            ],
            0,
            0,
        )
        where = _where(item_id, output_index, b',"content_index":0')
        kind = "response.output_text.delta"
        for text, piece, tokens in _zip(draft.plan.content):
            yield Beat.CONTENT, [self.delta(kind, where, piece, b',"logprobs":[]')], tokens, 0
            draft.text.append(text)
        part = draft.text_part()
        yield (
            Beat.FRAME,
            [
                self.event(
                    "response.output_text.done",
                    **at,
                    content_index=0,
                    text=part["text"],
                    logprobs=[],
                ),
                self.event("response.content_part.done", **at, content_index=0, part=part),
                self._done(output_index, "message", item_id),
            ],
            0,
            0,
        )

    def _call(self, output_index: int, item_id: str) -> Iterator[Step]:
        draft = self.draft
        yield Beat.FRAME, [self._added(output_index, "function_call", item_id)], 0, 0
        where = _where(item_id, output_index, b"")
        kind = "response.function_call_arguments.delta"
        for text, piece, tokens in _zip(draft.plan.arguments):
            yield Beat.CONTENT, [self.delta(kind, where, piece)], tokens, 0
            draft.arguments.append(text)
        yield (
            Beat.FRAME,
            [
                self.event(
                    "response.function_call_arguments.done",
                    item_id=item_id,
                    output_index=output_index,
                    arguments="".join(draft.arguments),
                ),
                self._done(output_index, "function_call", item_id),
            ],
            0,
            0,
        )

    def content(self, piece: bytes) -> bytes:
        item_id = next((i for k, i in self.draft.items if k == "message"), "msg_sim")
        where = _where(item_id, 0, b',"content_index":0')
        return self.delta("response.output_text.delta", where, piece, b',"logprobs":[]')

    def error(self) -> bytes:
        """OpenAI's `error` event: the fields the SDKs' type names, and the `error` object the
        API nests too, on which the official SDKs raise."""
        message, code = "sim: injected error event", "sim_error_event"
        nested = {"type": "server_error", "code": code, "message": message, "param": None}
        return self.event("error", code=code, message=message, param=None, error=nested)

    def end(self, tally: Tally, ending: Ending) -> list[bytes]:
        if ending == "cut":
            return []
        status: Status = "completed" if ending == "completed" else ending
        self.last = self.draft.response(status, self.draft.usage(tally.tokens, tally.reasoning))
        return [self.event("response." + status, response=self.last)]


def _where(item_id: str, output_index: int, extra: bytes) -> bytes:
    index = str(output_index).encode()
    return b'"item_id":' + orjson.dumps(item_id) + b',"output_index":' + index + extra


def _zip(pieces: Pieces) -> Iterator[tuple[str, bytes, int]]:
    return zip(pieces.text, pieces.json, pieces.tokens, strict=True)


def whole_response(draft: Draft) -> dict[str, Any]:
    """The response object of a non-streamed request, and the faults that shape one: `failed`
    (no output), `incomplete` (the token pieces cut after `fail_after`)."""
    plan = draft.plan
    status: Status = "completed"
    budget = len(plan.reasoning.text) + len(plan.content.text) + len(plan.arguments.text)
    if plan.fault == "failed":
        status, budget = "failed", 0
    elif plan.fault == "incomplete":
        status, budget = "incomplete", plan.fail_after
    tally = Tally()
    for part, into, reasoning in (
        (plan.reasoning, draft.reasoning, True),
        (plan.content, draft.text, False),
        (plan.arguments, draft.arguments, False),
    ):
        for text, tokens in zip(part.text, part.tokens, strict=True):
            if tally.steps >= budget:
                break
            into.append(text)
            tally.steps += 1
            tally.tokens += tokens
            tally.reasoning += tokens if reasoning else 0
    return draft.response(status, draft.usage(tally.tokens, tally.reasoning))
