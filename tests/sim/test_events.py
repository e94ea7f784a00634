"""The pre-serialised events equal what orjson makes of the same objects, one write each."""

from __future__ import annotations

from typing import Any, cast

import orjson
import pytest
from aiohttp import web

from gateway.sim.events import DONE, ChunkEncoder
from gateway.sim.steering import SimDefaults, Steer, pieces, resolve
from gateway.sim.stream import ChatShape, write_stream
from gateway.tokens import Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def o200k() -> Tokenizer:
    return load_tokenizer("o200k_base")


def data(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_events_equal_orjson_of_openai_chunks(include_usage: bool) -> None:
    enc = ChunkEncoder(
        "chat", response_id="chatcmpl-1", created=7, model='m\u00e9"x', include_usage=include_usage
    )
    head: dict[str, Any] = {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": 'm\u00e9"x',
    }  # fmt: skip
    tail = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0) -> bytes:
        choice = {"index": index, "delta": delta, "finish_reason": finish}
        return data({**head, "choices": [choice], **tail})

    assert enc.role(3) == chunk({"role": "assistant", "content": ""}, index=3)
    assert enc.content(0, orjson.dumps(' "q"\n')) == chunk({"content": ' "q"\n'})
    assert enc.reasoning(1, b'"hm"') == chunk({"reasoning_content": "hm"}, index=1)
    assert enc.finish(0, b'"length"') == chunk({}, "length")
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert enc.usage(usage) == data({**head, "choices": [], "usage": usage})


def test_text_completion_events_equal_orjson_of_openai_chunks() -> None:
    enc = ChunkEncoder("text", response_id="cmpl-1", created=7, model="m", include_usage=False)
    head = {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m"}

    def chunk(text: str, finish: str | None = None) -> bytes:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return data({**head, "choices": [choice]})

    assert enc.content(0, b'" fox"') == chunk(" fox")
    assert enc.finish(0, b'"stop"') == chunk("", "stop")


class RecordingResponse:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.writes.append(data)


async def test_each_event_is_its_own_write_even_without_delay(o200k: Tokenizer) -> None:
    enc = ChunkEncoder("chat", response_id="c", created=1, model="m", include_usage=True)
    plan = resolve(Steer(chunks=3, reasoning_chunks=1), SimDefaults(), kind="chat", tokenizer=o200k)
    resp = RecordingResponse()

    await write_stream(
        cast(web.BaseRequest, None),  # delays of 0 never look at the connection
        cast(web.StreamResponse, resp),
        ChatShape(enc, plan, n=2, prompt_tokens=5, include_usage=True),
        plan,
    )

    assert all(w.startswith(b"data: ") and w.endswith(b"\n\n") for w in resp.writes)
    assert all(w.count(b"\n\n") == 1 for w in resp.writes)
    # 2 choices x (role, 1 reasoning, 3 content, finish), usage, [DONE]
    assert len(resp.writes) == 2 * 6 + 2
    assert resp.writes[-1] == DONE
    assert orjson.loads(resp.writes[-2][6:])["usage"]["completion_tokens"] == 8


def test_pieces_cycle_with_a_space_and_trim(o200k: Tokenizer) -> None:
    assert pieces("a b", 5, "o200k_base").text == ("a", " b", " a", " b", " a")
    assert pieces("a b c", 2, "o200k_base").text == ("a", " b")
    assert pieces("", 4, "o200k_base").text == ()
    assert pieces("  ", None, "o200k_base").text == ("  ",)
    assert pieces("x", 1, "o200k_base").json == (b'"x"',)


def test_each_piece_carries_its_o200k_count(o200k: Tokenizer) -> None:
    got = pieces("Ünïcödé résumé 日本語の", None, "o200k_base")

    assert got.tokens == tuple(o200k.count(piece) for piece in got.text)
    assert got.total > len(got.text)  # multi-token pieces: not one per piece
