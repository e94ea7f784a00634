"""Token counting: which tokenizer a route uses, and the prompt estimate at admission.

The BPE tables are the files OpenAI publishes, shipped gzip'd in `gateway/tokenizer_data`
and checked against the sha256 that tiktoken itself pins. tiktoken's own loader is not
used: it looks in a cache directory and downloads on a miss, and the gateway must never
touch the network to count. Loading takes a few hundred milliseconds and reads a file, so
call `load_tokenizer` at start-up, off the event loop; it is cached per process.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol, get_args

import tiktoken

from .config import TokenizerName


class Tokenizer(Protocol):
    """Counts the tokens of a piece of text; `name` is the one the configuration uses."""

    @property
    def name(self) -> str: ...

    def count(self, text: str) -> int: ...


@dataclass(frozen=True, slots=True)
class _BpeSpec:
    """What tiktoken needs besides the ranks; copied from tiktoken_ext/openai_public.py.

    tiktoken builds these inside functions that also download the ranks, so they cannot
    be read without a download; they are restated here, and a test checks them against
    tiktoken's constructors (with the download replaced by the shipped file).
    """

    pat_str: str
    special_tokens: tuple[tuple[str, int], ...]
    sha256: str  # of the decompressed file: tiktoken's `expected_hash`


_ENDOFTEXT = "<|endoftext|>"
_FIM_PREFIX = "<|fim_prefix|>"
_FIM_MIDDLE = "<|fim_middle|>"
_FIM_SUFFIX = "<|fim_suffix|>"
_ENDOFPROMPT = "<|endofprompt|>"

_BPE_SPECS: Mapping[str, _BpeSpec] = {
    "o200k_base": _BpeSpec(
        pat_str="|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        special_tokens=((_ENDOFTEXT, 199999), (_ENDOFPROMPT, 200018)),
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": _BpeSpec(
        pat_str=r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",  # noqa: E501 (verbatim)
        special_tokens=(
            (_ENDOFTEXT, 100257),
            (_FIM_PREFIX, 100258),
            (_FIM_MIDDLE, 100259),
            (_FIM_SUFFIX, 100260),
            (_ENDOFPROMPT, 100276),
        ),
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}


#: the count cache of a BPE tokenizer: pieces up to this long, this many of them (~2 MB)
COUNT_CACHE_MAX_CHARS = 16
COUNT_CACHE_ENTRIES = 16384
#: texts at least this long (a conversation's earlier messages, sent again with every turn)
#: are remembered by their length and hash, so that no text is kept: this many of them
LONG_COUNT_MIN_CHARS = 256
LONG_COUNT_ENTRIES = 4096


class BpeTokenizer:
    """An OpenAI BPE encoding. Special-token text in model output counts as plain text."""

    __slots__ = ("_encode", "_known", "_long", "encoding", "name")

    def __init__(self, name: str, encoding: tiktoken.Encoding) -> None:
        self.name = name
        self.encoding = encoding
        self._encode = encoding.encode_ordinary  # bound once: count() runs per chunk
        #: counts of short pieces seen before: a stream's deltas are mostly a token or two,
        #: and the same few thousand of them come back all the time (a dict hit costs a
        #: sixth of an encode); bounded, and emptied whole when full
        self._known: dict[str, int] = {}
        #: counts of long texts seen before, by (length, hash): every turn of a chat sends
        #: the whole conversation again, and its prompt estimate would otherwise encode all
        #: of it each time, on the event loop (about 1.5 ms for 50 KB). A collision of both
        #: (64-bit keyed hash) in a few thousand entries is not a practical concern for an
        #: estimate. Bounded, and emptied whole when full.
        self._long: dict[tuple[int, int], int] = {}

    def count(self, text: str) -> int:
        n = self._known.get(text)
        if n is not None:
            return n
        size = len(text)
        if size < LONG_COUNT_MIN_CHARS:
            n = len(self._encode(text))
            if size <= COUNT_CACHE_MAX_CHARS:
                if len(self._known) >= COUNT_CACHE_ENTRIES:
                    self._known.clear()
                self._known[text] = n
            return n
        key = (size, hash(text))  # the hash is the one the lookup above computed
        n = self._long.get(key)
        if n is None:
            n = len(self._encode(text))
            if len(self._long) >= LONG_COUNT_ENTRIES:
                self._long.clear()
            self._long[key] = n
        return n


class ChunksTokenizer:
    """One token per non-empty piece: right when the upstream sends a token per event."""

    __slots__ = ()
    name = "chunks"

    def count(self, text: str) -> int:
        return 1 if text else 0


class CharsTokenizer:
    """ceil(len / 4): OpenAI's rule of thumb for English, with no table to load.

    Each piece is rounded up on its own, so a stream of one-token events counts about
    one per event, never fewer than a whole-text count.
    """

    __slots__ = ()
    name = "chars"

    def count(self, text: str) -> int:
        return (len(text) + 3) // 4


#: every name a route's `tokenizer` may take (config.TokenizerName, the one list)
TOKENIZER_NAMES: tuple[str, ...] = get_args(TokenizerName)


def load_tokenizer(name: str) -> Tokenizer:
    """Return the tokenizer called `name`; BPE tables are read once per process."""
    if name == "chunks":
        return ChunksTokenizer()
    if name == "chars":
        return CharsTokenizer()
    if name in _BPE_SPECS:
        return _load_bpe(name)
    raise ValueError(f"unknown tokenizer {name!r}; valid: {', '.join(TOKENIZER_NAMES)}")


@functools.cache
def _load_bpe(name: str) -> BpeTokenizer:
    """Build the encoding from the shipped file (cached: the result is immutable)."""
    spec = _BPE_SPECS[name]
    data = _read_checked(f"{name}.tiktoken.gz", spec.sha256)
    encoding = tiktoken.Encoding(
        name,
        pat_str=spec.pat_str,
        mergeable_ranks=_parse_ranks(data),
        special_tokens=dict(spec.special_tokens),
    )
    return BpeTokenizer(name, encoding)


def _read_checked(filename: str, sha256: str) -> bytes:
    """Read and decompress a shipped table; refuse it if it is not OpenAI's file."""
    resource = resources.files(__package__ or "gateway") / "tokenizer_data" / filename
    data = gzip.decompress(resource.read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(f"tokenizer data {resource} has sha256 {digest}, expected {sha256}")
    return data


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    """Parse the `.tiktoken` format: one `base64(token) rank` pair per line."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


# OpenAI's accounting for chat input (the "How to count tokens" cookbook): every message
# costs 3 tokens of framing, a `name` one more, and the reply is primed with 3.
_PER_MESSAGE = 3
_PER_NAME = 1
_REPLY_PRIMING = 3


def estimate_prompt_tokens(body: Mapping[str, Any], tokenizer: Tokenizer) -> int:
    """Estimate the prompt tokens of a request body before it goes upstream.

    Reads chat `messages`, completions `prompt`, embeddings `input`, the Responses API's
    `instructions` and `input` (a string, or items: their text content parts, tool call
    arguments and outputs; images and files are not counted), plus `tools` (sent to the
    model as text too). Fields of the wrong shape are skipped: this runs on client input and
    must never raise. With the `chunks` tokenizer, which has no meaning for a prompt, the
    `chars` rule is used.
    """
    count = (CharsTokenizer() if tokenizer.name == "chunks" else tokenizer).count
    total = sum(count(text) for text in _prompt_texts(body))
    messages = body.get("messages")
    if isinstance(messages, list):
        total += _REPLY_PRIMING + _PER_MESSAGE * len(messages)
        total += _PER_NAME * sum(1 for m in messages if isinstance(m, Mapping) and "name" in m)
    items = [item for item in _list(body.get("input")) if isinstance(item, Mapping)]
    if items or isinstance(body.get("instructions"), str):
        total += _REPLY_PRIMING + _PER_MESSAGE * (len(items) + 1)
    total += _token_ids(body.get("prompt")) + _token_ids(body.get("input"))
    return total


def _prompt_texts(body: Mapping[str, Any]) -> Iterator[str]:
    """Every piece of text in the request that the model reads."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, Mapping):
                yield from _message_texts(message)
    for key in ("prompt", "input"):
        yield from _strings(body.get(key))
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        yield instructions
    for item in _list(body.get("input")):
        if isinstance(item, Mapping):
            yield from _item_texts(item)
    yield from _nested_strings(body.get("tools"))


#: the text fields of a Responses API input item (a message's `content` aside): a tool
#: call's name and arguments, a custom tool's input, a tool's output
_ITEM_TEXT_KEYS = ("name", "arguments", "input", "output")


def _item_texts(item: Mapping[str, Any]) -> Iterator[str]:
    """A Responses API input item's text: message content (a string or text parts, images
    and files skipped), reasoning summaries, tool calls and their outputs."""
    content = item.get("content")
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        yield from _part_texts(content)
    summary = item.get("summary")
    if isinstance(summary, list):
        yield from _part_texts(summary)
    for key in _ITEM_TEXT_KEYS:
        value = item.get(key)
        if isinstance(value, str):
            yield value
        elif key == "output" and isinstance(value, list):
            yield from _part_texts(value)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _message_texts(message: Mapping[str, Any]) -> Iterator[str]:
    """A message's strings (role, content, name, ids) and its parts and tool calls."""
    for key, value in message.items():
        if isinstance(value, str):
            yield value
        elif key == "content" and isinstance(value, list):
            yield from _part_texts(value)
        elif key == "tool_calls" and isinstance(value, list):
            yield from _tool_call_texts(value)


def _part_texts(parts: list[Any]) -> Iterator[str]:
    """Text parts of a multi-part content (images and audio are not counted)."""
    for part in parts:
        if isinstance(part, Mapping) and isinstance(part.get("text"), str):
            yield part["text"]
        elif isinstance(part, str):
            yield part


def _tool_call_texts(calls: list[Any]) -> Iterator[str]:
    """Function names and arguments of the tool calls in an assistant message."""
    for call in calls:
        function = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(function, Mapping):
            for key in ("name", "arguments"):
                if isinstance(function.get(key), str):
                    yield function[key]


def _nested_strings(value: Any) -> Iterator[str]:
    """Keys and strings of a JSON value (tool schemas), walked without recursion.

    OpenAI renders tools into the prompt in an undocumented format; their names,
    descriptions and parameter names are most of it, and walking them cannot fail on any
    shape a client sends, as serialising it again could.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _strings(value: Any) -> Iterator[str]:
    """A `prompt` or `input`: a string or a list of strings."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        yield from (item for item in value if isinstance(item, str))


def _token_ids(value: Any) -> int:
    """A `prompt` or `input` may be token ids already (a list, or a list of lists)."""
    if not isinstance(value, list):
        return 0
    return sum(
        1 if isinstance(item, int) else len(item) if isinstance(item, list) else 0 for item in value
    )
