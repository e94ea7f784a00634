"""What one request asks the simulator to do: its `sim` steering, resolved against the defaults.

Steering comes from the body field `"sim": {...}` (the OpenAI SDK sends it with
`extra_body={"sim": {...}}`) and from the same JSON in an `x-sim` request header; where both
name a key, the body wins. Unknown keys are an error, so a typo in a test fails loudly.

Text is cut into word-ish pieces (`" quick"`, `" brown"`), each about one BPE token, and each
piece is one content chunk. The pieces are JSON-encoded and counted (o200k_base, the gateway's
default tokenizer) once and cached, so the streaming loop only concatenates bytes and adds.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
import orjson

from gateway.tokens import Tokenizer, load_tokenizer

from .events import Kind

#: the default content: common English words, each piece about one BPE token
DEFAULT_TEXT = (
    "The quick brown fox jumps over the lazy dog while the small cat sleeps in the warm sun,"
    " and the old man reads a good book by the door."
)
#: the default reasoning text (`reasoning_chunks`, `think`)
REASONING_TEXT = (
    "Let me think about this step by step: the user wants a short answer, so I will keep it"
    " brief and clear."
)
#: the default content of the `split` fault: every piece holds multi-byte UTF-8 characters
MULTIBYTE_TEXT = "Ünïcödé café naïve résumé — 日本語の テキスト 🙂 smörgåsbord jalapeño"

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

#: what each fault does to a stream; to a whole (non-streamed) answer, see its note
Fault = Literal[
    "reset_before_headers",  # reset the TCP connection (RST) without answering; whole too
    "reset_mid_stream",  # after `fail_after` token chunks, abort the connection (what was
    # written still arrives; then the body never completes); whole: half the body, abort
    "stall",  # after `fail_after` token chunks, silence until the client leaves (an hour at
    # most, then abort); whole: headers, then silence
    "html_500",  # 500 with an HTML body; whole too
    "invalid_json",  # after `fail_after` token chunks, one event whose data is not JSON, and
    # the stream goes on; whole: the body cut in half
    "no_done",  # end the body cleanly without `data: [DONE]`; streams only
    "big_line",  # after `fail_after` token chunks, one content chunk whose `data:` line is
    # `big_bytes` long (it counts as a token); streams only
    "redirect",  # 302 to /sim/redirected; whole too
    "gzip",  # whole answers only: the body gzip-encoded, with Content-Encoding: gzip
    "crlf",  # \r\n line endings; streams only
    "split",  # each event in several writes 1 ms apart, cut inside `data:`, the JSON, a UTF-8
    # character (the default text becomes multi-byte) and the final "\n\n"; streams only
    "error_event",  # after `fail_after` token chunks, one `data: {"error": ...}` event, then the
    # body ends cleanly without [DONE] (Responses: an `error` event); streams only
    "failed",  # Responses only: after `fail_after` token chunks, `response.failed` ends the
    # stream; whole: a response with status "failed"
    "incomplete",  # Responses only: after `fail_after` token chunks, `response.incomplete`
    # (max_output_tokens) ends the stream; whole: the output cut there, status "incomplete"
]
#: the faults that only a Responses answer knows
RESPONSES_FAULTS = frozenset(("failed", "incomplete"))

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
Millis = Annotated[float, msgspec.Meta(ge=0)]


class ToolCall(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`tool_call`: the answer ends in a call of this function, its arguments streamed in pieces
    (Responses: a `function_call` output item)."""

    name: str = "get_weather"
    arguments: str = '{"city": "Paris", "unit": "celsius"}'


@dataclass(frozen=True, slots=True)
class SimDefaults:
    """What a request gets when its steering does not say (create_sim_app, the CLI's flags)."""

    chunks: int = 16
    delay_ms: float = 0.0
    ttft_ms: float = 0.0
    text: str = DEFAULT_TEXT
    #: how many received requests SimState keeps
    record_limit: int = 256
    #: what GET /v1/models lists
    models: tuple[str, ...] = ("sim-small", "sim-large", "sim-reasoning")


class Steer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The `sim` object as a request sends it; None means "the default"."""

    chunks: NonNegInt | None = None
    ttft_ms: Millis | None = None
    headers_delay_ms: Millis = 0.0
    delay_ms: Millis | None = None
    text: str | None = None
    reasoning_chunks: NonNegInt = 0
    think: bool = False
    finish_reason: str | None = None  # "stop", or "tool_calls" with a tool call
    status: Annotated[int, msgspec.Meta(ge=400, le=599)] | None = None
    retry_after: Annotated[float, msgspec.Meta(ge=0)] | None = None
    fault: Fault | None = None
    fail_after: NonNegInt = 0
    big_bytes: Annotated[int, msgspec.Meta(ge=256, le=64 * 1024 * 1024)] = 2 * 1024 * 1024
    tool_call: ToolCall | None = None
    #: Responses usage: this many of the input tokens were read from the cache (at most all)
    cached_tokens: NonNegInt = 0


@dataclass(frozen=True, slots=True)
class Pieces:
    """One answer's chunks: the strings, the same strings JSON-encoded for the stream, and
    each one's token count (what the gateway counts for that chunk)."""

    text: tuple[str, ...]
    json: tuple[bytes, ...]
    tokens: tuple[int, ...]

    def joined(self) -> str:
        return "".join(self.text)

    @property
    def total(self) -> int:
        return sum(self.tokens)


@dataclass(frozen=True, slots=True)
class Plan:
    """One request's steering with every default filled in, delays in seconds."""

    content: Pieces
    #: reasoning chunks, `<think>` and `</think>` included when `think` is set
    reasoning: Pieces
    think: bool
    finish_reason: str
    ttft_s: float
    delay_s: float
    headers_delay_s: float
    status: int | None
    retry_after: float | None
    fault: Fault | None
    fail_after: int
    big_bytes: int
    #: the function call the answer ends in (its arguments in pieces), or None
    tool_name: str | None
    arguments: Pieces
    cached_tokens: int
    tokenizer: Tokenizer


class SteeringError(ValueError):
    """The steering could not be read; the message names the key."""


def read_steering(body_sim: Any, header: str | None) -> Steer:
    merged: dict[str, Any] = {}
    if header is not None:
        try:
            from_header = orjson.loads(header)
        except orjson.JSONDecodeError as exc:
            raise SteeringError(f"x-sim header is not JSON: {exc}") from None
        merged.update(_object(from_header, "x-sim header"))
    if body_sim is not None:
        merged.update(_object(body_sim, "body field `sim`"))
    try:
        return msgspec.convert(merged, Steer)
    except msgspec.ValidationError as exc:
        raise SteeringError(f"invalid sim steering: {exc}") from None


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SteeringError(f"{where} must be a JSON object")
    return value


def resolve(steer: Steer, defaults: SimDefaults, *, kind: Kind, tokenizer: Tokenizer) -> Plan:
    """Fill in the defaults. Plain completions have no reasoning field: they always `think`;
    Responses have a reasoning item of their own: they never do."""
    if steer.fault in RESPONSES_FAULTS and kind != "responses":
        raise SteeringError(f"fault {steer.fault!r} is for /v1/responses only")
    call = steer.tool_call
    if call is not None and kind == "text":
        raise SteeringError("tool_call is for chat completions and responses only")
    think = (steer.think or kind == "text") and kind != "responses"
    text = steer.text
    if text is None:
        text = MULTIBYTE_TEXT if steer.fault == "split" else defaults.text
    chunks = steer.chunks
    if chunks is None and steer.text is None:
        chunks = defaults.chunks
    reasoning = pieces(REASONING_TEXT, steer.reasoning_chunks, tokenizer.name)
    if think and reasoning.text:
        reasoning = _wrap_think(reasoning, tokenizer.name)
    call = steer.tool_call
    return Plan(
        content=pieces(text, chunks, tokenizer.name),
        reasoning=reasoning,
        think=think,
        finish_reason=steer.finish_reason or ("stop" if call is None else "tool_calls"),
        ttft_s=_seconds(steer.ttft_ms, defaults.ttft_ms),
        delay_s=_seconds(steer.delay_ms, defaults.delay_ms),
        headers_delay_s=steer.headers_delay_ms / 1000,
        status=steer.status,
        retry_after=steer.retry_after,
        fault=steer.fault,
        fail_after=steer.fail_after,
        big_bytes=steer.big_bytes,
        tool_name=None if call is None else call.name,
        arguments=pieces("" if call is None else call.arguments, None, tokenizer.name),
        cached_tokens=steer.cached_tokens,
        tokenizer=tokenizer,
    )


def _seconds(ms: float | None, default_ms: float) -> float:
    return (default_ms if ms is None else ms) / 1000


_WORD = re.compile(r"\s*\S+")


@functools.lru_cache(maxsize=64)
def pieces(text: str, count: int | None, tokenizer: str) -> Pieces:
    """`text` in word-ish pieces, cycled or trimmed to `count` (None: as many as it has),
    counted with the tokenizer of that name (loaded already: `load_tokenizer` caches it).

    When the text starts over, its first piece gets a leading space so the words stay apart.
    """
    words: list[str] = _WORD.findall(text) or ([text] if text else [])
    if count is None:
        count = len(words)
    if not words:
        return Pieces((), (), ())
    out: list[str] = []
    for i in range(count):
        word = words[i % len(words)]
        if i >= len(words) and i % len(words) == 0 and not word[:1].isspace():
            word = " " + word
        out.append(word)
    return _encoded(tuple(out), tokenizer)


def _wrap_think(reasoning: Pieces, tokenizer: str) -> Pieces:
    return _encoded((THINK_OPEN, *reasoning.text, THINK_CLOSE), tokenizer)


def _encoded(text: tuple[str, ...], tokenizer: str) -> Pieces:
    """The pieces, JSON-encoded and counted one by one: the gateway meters a stream per
    chunk, so a count per piece (not of the whole text) is what agrees with it."""
    count = load_tokenizer(tokenizer).count
    return Pieces(text, tuple(orjson.dumps(w) for w in text), tuple(count(w) for w in text))
