"""The bare aiohttp relay and the bench upstream's short calls.

The relay is the floor the gateway is compared with, so it must relay what the gateway does:
streams and non-streaming answers, byte for byte, with the upstream's status and
Content-Type. The bench's own client checks the bytes; the `openai` SDK checks that the
answers are what an OpenAI client reads.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from bench import calls, cli, scenarios
from bench.loadgen import LoadSpec
from bench.targets import BareRelay, Env, Target


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[scenarios.LoadSide, Target]]:
    """The bench upstream and the bare relay in front of it, unpinned."""
    with cli.upstream(None) as (pid, port):
        env = Env(Path(tmp_path_factory.mktemp("relay")), port, None, 4096)
        target = BareRelay(env, "aiohttp-relay", None)
        target.start()
        try:
            yield scenarios.LoadSide(None, pid), target
        finally:
            target.stop()


@pytest.mark.parametrize(
    ("call", "new_connection"),
    [("stream", False), ("stream", True), ("chat", False), ("embeddings", False)],
)
def test_bare_relay_passes_streams_and_calls_through_byte_exact(
    relay: tuple[scenarios.LoadSide, Target], call: str, new_connection: bool
) -> None:
    side, target = relay
    spec = LoadSpec(
        mode="sequential", port=target.port, events=5, delay_ms=0, requests=30,
        warmup_requests=2, new_connection=new_connection, call=call,  # type: ignore[arg-type]
    )  # fmt: skip
    result = scenarios.run_load(side, target, spec, 30.0).result

    assert result.errors == {}
    assert result.requests == 30  # every answer compared whole with the bytes it must be
    assert result.ttft_ms.samples == 30


def test_bare_relay_keeps_the_upstreams_status_and_content_type(
    relay: tuple[scenarios.LoadSide, Target],
) -> None:
    _, target = relay
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{target.port}/v1", api_key="unused")

    chat = client.chat.completions.with_raw_response.create(
        model="bench-1",
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"bench": {"words": 3}},
    )
    embedding = client.embeddings.with_raw_response.create(
        model="bench-1", input="hi", extra_body={"bench": {"dims": 8}}
    )
    with client.chat.completions.with_streaming_response.create(
        model="bench-1", messages=[{"role": "user", "content": "hi"}], stream=True,
        extra_body={"bench": {"events": 6}},
    ) as stream:  # fmt: skip
        stream_type = stream.headers["content-type"]
        text = "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices)
    with pytest.raises(openai.NotFoundError):
        client.models.list()  # the bench upstream knows no /v1/models: its 404 comes back

    assert chat.headers["content-type"] == "application/json"
    completion = chat.parse()
    assert completion.choices[0].message.content == "the quick brown"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3
    assert embedding.headers["content-type"] == "application/json"
    vector = embedding.parse().data[0].embedding
    assert len(vector) == 8 and vector[0] == round(math.sin(1), 6)
    assert embedding.parse().usage.prompt_tokens == calls.PROMPT_TOKENS["embeddings"]
    assert stream_type == "text/event-stream"
    assert text == " the quick brown"


def test_the_upstream_streams_only_a_chat_completion_that_asks_for_it() -> None:
    assert calls.call_for("/v1/chat/completions", b'{"stream": true}') is None
    assert calls.call_for("/v1/chat/completions", b'{"stream": false}') == calls.CallSpec(
        "chat", calls.DEFAULT_SIZE["chat"]
    )
    assert calls.call_for("/v1/chat/completions", b'{"bench": {"words": 5}}') == calls.CallSpec(
        "chat", 5
    )
    assert calls.call_for("/v1/embeddings", b'{"bench": {"dims": 3}}') == calls.CallSpec(
        "embeddings", 3
    )
    assert calls.call_for("/v1/responses", b"{}") is None
