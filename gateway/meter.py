"""Token accounting from a parsed copy of what the upstream sends.

The relay writes each chunk to the client, then feeds the same bytes to a meter:

    StreamMeter.feed(chunk) -> SSEDecoder -> orjson -> _Ledger (per-choice counts)
                                                         '-> TokenSink.add(deltas)
    StreamMeter.finish()    -> Tally (the log line and the final metrics)

Counting rules, per choice index:
* `delta.content` (chat) and `text` (completions) are completion tokens;
* `delta.reasoning_content` (or vLLM's `delta.reasoning`) and text inside
  `<think>...</think>` in content are reasoning tokens, and completion tokens as well;
* tool call arguments are completion tokens;
* an event carrying a `usage` object makes the final tally the upstream's own numbers,
  and what we counted stays in `estimated_completion`, so the drift can be observed.

Nothing here raises on what an upstream sends: bad JSON is counted and skipped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import orjson

from gateway.sse import ServerSentEvent, SSEDecoder
from gateway.tokens import Tokenizer

_DONE = b"[DONE]"
_CONTENT_KEY = b'"content":"'
#: bytes that cannot stand as they are inside a JSON string: its end, an escape, a control
_NOT_PLAIN = re.compile(rb'["\\\x00-\x1f]')
_OPEN = "<think>"
_CLOSE = "</think>"
_CLOSE_LEN = len(_CLOSE)

Count = Callable[[str], int]


class TokenSink(Protocol):
    """Receives tokens as they pass (metrics, token budgets).

    `completion` includes `reasoning`: a reasoning token is counted as both.
    """

    def add(self, completion: int, reasoning: int) -> None: ...


@dataclass(slots=True)
class Tally:
    """What one request used, for the log line and the final metrics."""

    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    usage_source: Literal["upstream", "estimate"]
    estimated_completion: int  # what we counted ourselves, whatever the upstream said
    chunks: int  # events that carried content, reasoning or tool call arguments
    finish_reason: str | None  # choice 0's, else the last one seen
    finish_reasons: tuple[str, ...]  # one per choice that finished, by choice index
    saw_done: bool
    decode_errors: int  # events whose data was not JSON (relayed anyway)
    upstream_error: Mapping[str, Any] | None  # the `error` object of an error event
    cached_prompt_tokens: int = 0  # of prompt_tokens, the upstream's `cached_tokens`


class _ThinkText:
    """Splits one choice's content into answer and `<think>` reasoning, across chunks.

    States: START (no tag seen yet), ANSWER, THINK. A tag split across chunks is held
    back (`carry`, at most 8 characters) until the next piece shows whether it is one.
    The tags count as reasoning text. Some chat templates put `<think>` in the prompt, so
    the output holds only `</think>`: a close tag in START turns everything counted so
    far (`early`) into reasoning too; nothing is taken back, the deltas stay >= 0.
    """

    __slots__ = ("carry", "early", "state")

    START, ANSWER, THINK = 0, 1, 2

    def __init__(self) -> None:
        self.state = self.START
        self.carry = ""
        self.early = 0  # tokens counted in START, reasoning if a bare `</think>` follows

    def add(self, text: str, count: Count) -> tuple[int, int]:
        """Count a content piece; return (completion, reasoning) deltas."""
        if not self.carry and "<" not in text:  # the common case: no tag can be here
            return self._plain(text, count)
        text, self.carry = self.carry + text, ""
        completion = reasoning = 0
        while text:
            text, c, r = self._step(text, count)
            completion += c
            reasoning += r
        return completion, reasoning

    def flush(self, count: Count) -> tuple[int, int]:
        """End of the answer: count text held back as a possible partial tag."""
        text, self.carry = self.carry, ""
        return self._plain(text, count) if text else (0, 0)

    def _plain(self, text: str, count: Count) -> tuple[int, int]:
        n = count(text)
        if self.state == self.THINK:
            return n, n
        if self.state == self.START:
            self.early += n
        return n, 0

    def _step(self, text: str, count: Count) -> tuple[str, int, int]:
        """Consume text up to the next tag (or hold a partial one); return the rest."""
        if self.state == self.THINK:
            return self._in_think(text, count)
        opened = text.find(_OPEN)
        closed = text.find(_CLOSE) if self.state == self.START else -1
        if closed >= 0 and (opened < 0 or closed < opened):
            end = closed + _CLOSE_LEN
            n = count(text[:end])
            retro, self.early, self.state = self.early, 0, self.ANSWER
            return text[end:], n, n + retro
        if opened >= 0:
            c, r = self._plain(text[:opened], count) if opened else (0, 0)
            self.state = self.THINK
            return text[opened:], c, r
        c, r = self._plain_holding(text, count)
        return "", c, r

    def _in_think(self, text: str, count: Count) -> tuple[str, int, int]:
        closed = text.find(_CLOSE)
        if closed < 0:
            c, r = self._plain_holding(text, count)
            return "", c, r
        end = closed + _CLOSE_LEN
        n = count(text[:end])
        self.state = self.ANSWER
        return text[end:], n, n

    def _plain_holding(self, text: str, count: Count) -> tuple[int, int]:
        """Count text with no complete tag, keeping back a suffix that may start one."""
        held = self._partial_tag_len(text)
        if held:
            text, self.carry = text[:-held], text[-held:]
        return self._plain(text, count) if text else (0, 0)

    def _partial_tag_len(self, text: str) -> int:
        """Length of the suffix of `text` that is a proper prefix of a tag we look for."""
        start = text.rfind("<")
        if start < 0 or len(text) - start >= _CLOSE_LEN:
            return 0
        tail = text[start:]
        if self.state != self.THINK and _OPEN.startswith(tail):
            return len(tail)
        if self.state != self.ANSWER and _CLOSE.startswith(tail):
            return len(tail)
        return 0


class _Ledger:
    """The counts of one response, whether streamed (deltas) or not (messages)."""

    __slots__ = (
        "chunks",
        "completion",
        "count",
        "decode_errors",
        "finish",
        "reasoning",
        "saw_done",
        "texts",
        "upstream_error",
        "usage",
    )

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.count: Count = tokenizer.count
        self.completion = 0
        self.reasoning = 0
        self.chunks = 0
        self.texts: dict[int, _ThinkText] = {}
        self.finish: dict[int, str] = {}
        self.usage: dict[str, Any] | None = None
        self.upstream_error: Mapping[str, Any] | None = None
        self.saw_done = False
        self.decode_errors = 0

    def parse(self, data: bytes | bytearray) -> Any:
        """The JSON of an event's data, or None (counted) when it is not JSON."""
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            if data.strip() == _DONE:
                self.saw_done = True
            else:
                self.decode_errors += 1
            return None

    def observe(self, obj: Any, field: str) -> None:
        """Count one parsed chunk (`field` "delta") or whole answer (`field` "message")."""
        if type(obj) is not dict:
            return
        choices = obj.get("choices")
        if choices and type(choices) is list and self._choices(choices, field):
            self.chunks += 1
        usage = obj.get("usage")
        if usage is not None and type(usage) is dict:
            self.usage = usage
        error = obj.get("error")
        if error is not None:
            self.upstream_error = error if type(error) is dict else {"message": str(error)}

    def _choices(self, choices: list[Any], field: str) -> bool:
        """Count every choice; return whether any carried text."""
        carried = False
        for position, choice in enumerate(choices):
            if type(choice) is not dict:
                continue
            index = choice.get("index", position)
            if type(index) is not int:
                index = position
            body = choice.get(field)
            if type(body) is dict:
                carried = self._body(index, body) or carried
            text = choice.get("text")
            if text and type(text) is str:
                self.content(index, text)
                carried = True
            reason = choice.get("finish_reason")
            if reason is not None:
                self.finish[index] = str(reason)
        return carried

    def _body(self, index: int, body: dict[str, Any]) -> bool:
        """A chat `delta` or `message`: content, reasoning, tool call arguments."""
        carried = False
        content = body.get("content")
        if content:
            if type(content) is list:  # a message given as parts
                content = "".join(p["text"] for p in content if _is_text_part(p))
            if type(content) is str:
                self.content(index, content)
                carried = True
        reasoning = body.get("reasoning_content") or body.get("reasoning")
        if reasoning and type(reasoning) is str:
            n = self.count(reasoning)
            self.completion += n
            self.reasoning += n
            carried = True
        calls = body.get("tool_calls")
        if calls and type(calls) is list:
            carried = self._tool_calls(calls) or carried
        legacy = body.get("function_call")
        if legacy and type(legacy) is dict:
            carried = self._arguments(legacy) or carried
        return carried

    def _tool_calls(self, calls: list[Any]) -> bool:
        carried = False
        for call in calls:
            if type(call) is dict:
                function = call.get("function")
                if type(function) is dict:
                    carried = self._arguments(function) or carried
        return carried

    def _arguments(self, function: dict[str, Any]) -> bool:
        arguments = function.get("arguments")
        if arguments and type(arguments) is str:
            self.completion += self.count(arguments)
            return True
        return False

    def content(self, index: int, text: str) -> None:
        """Answer text of one choice, `<think>` sections counted as reasoning too."""
        state = self.texts.get(index)
        if state is None:
            state = self.texts[index] = _ThinkText()
        completion, reasoning = state.add(text, self.count)
        self.completion += completion
        self.reasoning += reasoning

    def flush(self) -> None:
        """Count the text each choice held back as a possible partial tag."""
        for state in self.texts.values():
            completion, reasoning = state.flush(self.count)
            self.completion += completion
            self.reasoning += reasoning

    def tally(self, prompt_estimate: int) -> Tally:
        """The final numbers: the upstream's `usage` where it sent one, else ours."""
        usage = self.usage
        prompt, completion, reasoning = prompt_estimate, self.completion, self.reasoning
        cached = 0
        if usage is not None:
            prompt = _int_or(usage.get("prompt_tokens"), prompt)
            completion = _int_or(usage.get("completion_tokens"), completion)
            details = usage.get("completion_tokens_details")
            if type(details) is dict:
                reasoning = _int_or(details.get("reasoning_tokens"), reasoning)
            prompt_details = usage.get("prompt_tokens_details")
            if type(prompt_details) is dict:
                cached = _int_or(prompt_details.get("cached_tokens"), 0)
        reasons = tuple(self.finish[i] for i in sorted(self.finish))
        first = self.finish.get(0, reasons[-1] if reasons else None)
        return Tally(
            prompt_tokens=prompt,
            completion_tokens=completion,
            reasoning_tokens=reasoning,
            usage_source="estimate" if usage is None else "upstream",
            estimated_completion=self.completion,
            chunks=self.chunks,
            finish_reason=first,
            finish_reasons=reasons,
            saw_done=self.saw_done,
            decode_errors=self.decode_errors,
            upstream_error=self.upstream_error,
            cached_prompt_tokens=cached,
        )


def _is_text_part(part: Any) -> bool:
    return type(part) is dict and type(part.get("text")) is str


def _int_or(value: Any, default: int) -> int:
    """An upstream number if it is a non-negative int (not a bool), else the default."""
    return value if type(value) is int and value >= 0 else default


class _Template:
    """The bytes around the text of a stream's plain text chunks, learnt from one of them.

    Upstreams send the same chunk over and over with only the text changed: same id,
    model, created, choice index, `finish_reason: null`. Once the full path has parsed a
    chunk whose only effect was text for one choice, a later chunk made of the very same
    bytes around a plain JSON string (no quote, escape or control character; valid UTF-8)
    has the same effect with its own text, so it is counted without the JSON parse and the
    dict walk. Anything else, and any chunk that differs by one byte, takes the full path.
    """

    __slots__ = ("index", "prefix", "suffix")

    def __init__(self, prefix: bytes, suffix: bytes, index: int) -> None:
        self.prefix, self.suffix, self.index = prefix, suffix, index

    @classmethod
    def learn(cls, data: bytes, obj: Any) -> _Template | None:
        """The template of `data`, if its parse `obj` is a plain text chunk, else None."""
        if type(obj) is not dict or obj.get("usage") is not None or obj.get("error") is not None:
            return None
        choices = obj.get("choices")
        if type(choices) is not list or len(choices) != 1 or type(choices[0]) is not dict:
            return None
        choice = choices[0]
        delta = choice.get("delta")
        if choice.get("finish_reason") is not None or "text" in choice:
            return None
        if type(delta) is not dict or len(delta) != 1:
            return None
        text = delta.get("content")
        if type(text) is not str or not text:
            return None
        index = choice.get("index", 0)
        raw = text.encode()
        start = data.find(_CONTENT_KEY) + len(_CONTENT_KEY)
        end = start + len(raw)
        if (
            start < len(_CONTENT_KEY)
            or data.find(_CONTENT_KEY, start) >= 0
            or data[start:end] != raw
            or data[end : end + 1] != b'"'
            or _NOT_PLAIN.search(raw)
        ):
            return None  # the text is escaped in the JSON, or the key shows up twice
        return cls(data[:start], data[end:], index if type(index) is int else 0)

    def text(self, data: bytes) -> str | None:
        """The text of `data` if it is this template around a plain string, else None."""
        prefix, suffix = self.prefix, self.suffix
        end = len(data) - len(suffix)
        if end < len(prefix) or not data.startswith(prefix) or not data.endswith(suffix):
            return None
        raw = data[len(prefix) : end]
        if _NOT_PLAIN.search(raw):
            return None
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return None


class StreamMeter:
    """Counts the tokens of one SSE stream in real time, from a copy of its bytes.

    Feed it with `feed` (it decodes), or with `feed_event` when the relay decodes frames
    itself (`usage: inject`); not both. The sink gets one call per feed that counted
    something, and `finish` reports any held-back text, so the sum of what the sink
    received always equals `Tally.estimated_completion`.
    """

    __slots__ = (
        "_decoder",
        "_last",
        "_ledger",
        "_prompt_estimate",
        "_reported",
        "_reported_reasoning",
        "_sink",
        "_tally",
        "_template",
        "_templates",
    )

    def __init__(
        self,
        tokenizer: Tokenizer,
        sink: TokenSink,
        prompt_estimate: int,
        *,
        templates: bool = True,
    ) -> None:
        self._ledger = _Ledger(tokenizer)
        #: count plain text chunks by their template (see `_Template`); off only in tests,
        #: which check that it changes no count
        self._templates = templates
        self._template: _Template | None = None
        self._tally: Tally | None = None
        self._decoder = SSEDecoder()
        self._sink = sink
        self._prompt_estimate = prompt_estimate
        self._reported = 0
        self._reported_reasoning = 0
        self._last: tuple[ServerSentEvent, Any] | None = None  # is_usage_only's parse

    def feed(self, chunk: bytes) -> None:
        """Count the events that this chunk of the stream completes."""
        self._tally = None
        data = self._decoder.whole_event_data(chunk)  # nearly every chunk: one whole event
        if data is not None:
            self._count(data)
        else:
            for event in self._decoder.feed(chunk):
                self._count(event.data)
        self._report()

    def _count(self, data: bytes) -> None:
        ledger = self._ledger
        template = self._template
        if template is not None and (text := template.text(data)) is not None:
            if text:  # an empty text carries nothing, as in the full path
                ledger.content(template.index, text)
                ledger.chunks += 1
        elif data == _DONE:
            ledger.saw_done = True
        else:
            obj = ledger.parse(data)
            ledger.observe(obj, "delta")
            if self._templates:
                self._template = _Template.learn(data, obj) or template

    def feed_event(self, event: ServerSentEvent) -> None:
        """Count one event the relay already decoded."""
        self._tally = None
        if event.data == _DONE:
            self._ledger.saw_done = True
        else:
            self._ledger.observe(self._parse(event), "delta")
        self._report()

    def is_usage_only(self, event: ServerSentEvent) -> bool:
        """Whether this is the usage-only event (`choices` empty, `usage` an object).

        That is the event `usage: inject` hides from a client that did not ask for it.
        """
        if event.data.find(b'"usage"') < 0:  # not `in`: see SSEDecoder.whole_event_data
            return False
        obj = self._parse(event)
        return type(obj) is dict and not obj.get("choices") and type(obj.get("usage")) is dict

    def finish(self) -> Tally:
        """End of stream: count what is still pending and return the tally (the same one
        again until more is fed: the end of a stream asks for it more than once)."""
        if self._tally is None:
            for event in self._decoder.flush():
                self.feed_event(event)
            self._ledger.flush()
            self._report()
            self._tally = self._ledger.tally(self._prompt_estimate)
        return self._tally

    def _parse(self, event: ServerSentEvent) -> Any:
        """Parse once per event, whichever of feed_event and is_usage_only comes first."""
        last = self._last
        if last is not None and last[0] is event:
            return last[1]
        obj = self._ledger.parse(event.data)
        self._last = (event, obj)
        return obj

    def _report(self) -> None:
        ledger = self._ledger
        completion = ledger.completion - self._reported
        reasoning = ledger.reasoning - self._reported_reasoning
        if completion or reasoning:
            self._reported = ledger.completion
            self._reported_reasoning = ledger.reasoning
            self._sink.add(completion, reasoning)


class JsonMeter:
    """Counts the tokens of a non-streamed answer, from a bounded copy of its body."""

    __slots__ = ("_body", "_ledger", "_max_bytes", "_overflow", "_prompt_estimate")

    def __init__(
        self, tokenizer: Tokenizer, prompt_estimate: int, max_bytes: int = 8 << 20
    ) -> None:
        self._ledger = _Ledger(tokenizer)
        self._prompt_estimate = prompt_estimate
        self._max_bytes = max_bytes
        self._body = bytearray()
        self._overflow = False

    def feed(self, chunk: bytes) -> None:
        """Keep a copy, up to `max_bytes`; past that, the answer goes uncounted."""
        if self._overflow:
            return
        if len(self._body) + len(chunk) > self._max_bytes:
            self._overflow = True
            self._body = bytearray()
            return
        self._body += chunk

    def finish(self) -> Tally:
        """The body's `usage` when present, else the tokenizer's count of the choices.

        Idempotent, as `StreamMeter.finish`: the copy is counted once, then let go.
        """
        ledger = self._ledger
        if not self._overflow and self._body:
            ledger.observe(ledger.parse(self._body), "message")
            ledger.flush()
            self._body = bytearray()
        return ledger.tally(self._prompt_estimate)
