"""Metering in batches: the same counts as metering inline, only a few milliseconds later.

The relay hands each stream's pieces to `MeterBatch.defer(meter.feed)`; the batch meters
every stream's waiting pieces in arrival order when its window ends, when it is full, when a
stream ends (`flush`) or when the metrics registry is collected.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from gateway.ledger import LiveCount
from gateway.meter import StreamMeter
from gateway.meter_batch import MeterBatch
from gateway.metrics import GatewayMetrics
from gateway.tokens import load_tokenizer
from tests.accounting.streams import DONE, chunk, delta


class Sink:
    def __init__(self) -> None:
        self.completion = 0

    def add(self, completion: int, reasoning: int) -> None:
        self.completion += completion


def pieces(*texts: str) -> list[bytes]:
    stream = b"".join(chunk(delta(content=text)) for text in texts) + DONE
    return [stream[i : i + 7] for i in range(0, len(stream), 7)]  # cut anywhere


def meter(sink: Sink) -> StreamMeter:
    return StreamMeter(load_tokenizer("chars"), sink, 0)


async def test_interleaved_streams_get_the_counts_of_inline_metering() -> None:
    batch = MeterBatch(window_s=60)
    first, second = pieces("Hello", " world", "!"), pieces("東京", " is", " big", " ☃")
    inline = [Sink(), Sink()]
    batched = [Sink(), Sink()]
    meters = [meter(s) for s in inline]
    deferred = [batch.defer(meter(s).feed) for s in batched]
    for i in range(max(len(first), len(second))):
        for n, stream in enumerate((first, second)):
            if i < len(stream):
                meters[n].feed(stream[i])
                deferred[n].feed(stream[i])
    assert [s.completion for s in batched] == [0, 0]  # nothing metered before the flush
    batch.flush()
    assert [s.completion for s in batched] == [s.completion for s in inline]
    assert inline[0].completion > 0 and inline[1].completion > 0


async def test_the_window_ends_by_itself_and_a_full_batch_is_metered_at_once() -> None:
    timed, full = Sink(), Sink()
    by_time = MeterBatch(window_s=0.01).defer(meter(timed).feed)
    for piece in pieces("abcd", "efgh"):
        by_time.feed(piece)
    assert timed.completion == 0
    await asyncio.sleep(0.05)
    assert timed.completion == 2  # two pieces of 4 characters: one token each

    by_size = MeterBatch(window_s=60, max_pieces=2).defer(meter(full).feed)
    for piece in [chunk(delta(content="abcd")), chunk(delta(content="efgh"))]:
        by_size.feed(piece)
    assert full.completion == 2


async def test_a_meter_that_raises_is_switched_off_alone() -> None:
    batch = MeterBatch(window_s=60)
    calls: list[bytes] = []

    def broken(piece: bytes) -> None:
        calls.append(piece)
        raise ValueError("boom")

    healthy = Sink()
    bad, good = batch.defer(broken), batch.defer(meter(healthy).feed)
    with capture_logs() as logs:
        for text in ("abcd", "efgh"):
            bad.feed(chunk(delta(content=text)))
            good.feed(chunk(delta(content=text)))
        batch.flush()
    assert len(calls) == 1  # switched off after its first failure
    assert healthy.completion == 2
    assert [entry["event"] for entry in logs] == ["stream_observer_failed"]


async def test_collecting_the_registry_meters_what_waits() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    tokens = metrics.tokens
    live = LiveCount(
        tokens.labels("t", "m", "completion"), tokens.labels("t", "m", "reasoning"), []
    )
    deferred = metrics.batch.defer(StreamMeter(load_tokenizer("chars"), live, 0).feed)
    deferred.feed(chunk(delta(content="abcdefgh")))
    labels = {"team": "t", "model": "m", "type": "completion"}
    assert metrics.registry.get_sample_value("gateway_tokens_total", labels) == 2
