"""The dependencies' private internals the gateway relies on, checked by name on real objects
(canaries: a release that removes or renames one fails here, naming it), and the public-API
fallbacks the adapters take when one is gone (the same bytes, the same histogram).

The adapters are `gateway.aiohttp_private` and `gateway.prometheus_private`; no other module
reads these names (the last test here), except `relay_tap.Tap.deliver`'s per-event read of
the flow-control flag, which the adapter checks at tap time.
"""

from __future__ import annotations

import ast
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import StreamReader, web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway import aiohttp_private, prometheus_private, relay_tap
from gateway.aiohttp_private import PARKED, head_with_first_write, park_buffer, plain_writer
from gateway.client_response import HeadWithFirstWrite
from gateway.metrics import BatchedObserver
from gateway.prometheus_private import batch_adder
from tests.core.conftest import settings_for
from tests.core.test_relay_tap import DONE, EVENT, _dechunk, _exchange
from tests.support.fake_upstream import FakeUpstream, Script
from tests.support.gateway import running_gateway

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
AIOHTTP = f"aiohttp {aiohttp.__version__}"
PROMETHEUS = f"prometheus-client {version('prometheus-client')}"


# --- canaries: aiohttp ------------------------------------------------------------------------


@dataclass
class Served:
    """What a real aiohttp server handed one streamed request's handler."""

    resp: HeadWithFirstWrite
    writer: object
    reader: StreamReader
    plain: object  # what `plain_writer` said after the first write


@pytest.fixture
async def served() -> Served:
    seen: list[Served] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        park_buffer(request.content)
        resp = HeadWithFirstWrite()
        await resp.prepare(request)
        await resp.write(b"data: x\n\n")
        writer = getattr(resp, aiohttp_private.PAYLOAD_WRITER, None)
        seen.append(Served(resp, writer, request.content, plain_writer(resp)))
        await resp.write_eof()
        return resp

    assert await _serve_once(handler, b'{"model": "m"}') == b"data: x\n\n"
    [one] = seen
    return one


async def _serve_once(handler: Handler, body: bytes) -> bytes:
    """POST `body` to a real aiohttp server answering with `handler`; the answer's body."""
    app = web.Application()
    app.router.add_post("/", handler)
    async with TestClient(TestServer(app)) as client:
        answer = await client.post("/", data=body)
        return await answer.read()


def test_a_prepared_response_still_has_its_payload_writer(served: Served) -> None:
    assert type(served.writer) is aiohttp.http_writer.StreamWriter, (
        f"{AIOHTTP}: StreamResponse.{aiohttp_private.PAYLOAD_WRITER} is gone or no StreamWriter"
    )


@pytest.mark.parametrize("name", [*aiohttp_private.PLAIN_WRITER, *aiohttp_private.WRITER_USED])
def test_the_stream_writer_still_has(served: Served, name: str) -> None:
    assert hasattr(served.writer, name), f"{AIOHTTP}: StreamWriter.{name} is gone"


def test_the_client_protocol_still_has_its_flow_control_flag(served: Served) -> None:
    protocol = getattr(served.writer, "protocol", None)
    name = aiohttp_private.PROTOCOL_PAUSED
    assert isinstance(getattr(protocol, name, None), bool), f"{AIOHTTP}: protocol.{name} is gone"


def test_a_plain_stream_takes_the_fast_path_on_the_tested_release(served: Served) -> None:
    """The attributes are there and still mean plain framing after the first write."""
    assert served.plain is served.writer, f"{AIOHTTP}: plain_writer no longer sees plain framing"


@pytest.mark.parametrize(
    ("name", "value"), [("length", 12), ("_compress", object()), ("_headers_buf", b"head")]
)
async def test_a_writer_not_plain_is_refused_though_its_class_was_checked_before(
    name: str, value: object
) -> None:
    """The attributes' presence is checked once per class, their values on every stream."""
    answers: list[object] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = HeadWithFirstWrite()
        await resp.prepare(request)
        await resp.write(b"data: x\n\n")
        writer = getattr(resp, aiohttp_private.PAYLOAD_WRITER)
        answers.append(plain_writer(resp) is writer)  # its class: checked, found complete
        kept = getattr(writer, name)
        setattr(writer, name, value)
        answers.append(plain_writer(resp))
        setattr(writer, name, kept)
        answers.append(plain_writer(resp) is writer)
        await resp.write_eof()
        return resp

    assert await _serve_once(handler, b"{}") == b"data: x\n\n"
    assert answers == [True, None, True]


def test_stream_response_still_has_the_switch_that_holds_the_head(served: Served) -> None:
    name = aiohttp_private.SEND_HEADERS_IMMEDIATELY
    assert getattr(web.StreamResponse, name, None) is True, f"{AIOHTTP}: {name} is gone"
    assert getattr(HeadWithFirstWrite, name) is False


@pytest.mark.parametrize("name", aiohttp_private.READER_BUFFERS)
def test_a_request_body_reader_still_has(served: Served, name: str) -> None:
    assert name in StreamReader.__slots__, f"{AIOHTTP}: StreamReader.{name} is gone"


def test_a_body_read_to_its_end_is_parked_on_the_tested_release(served: Served) -> None:
    buffer, splits = aiohttp_private.READER_BUFFERS
    assert getattr(served.reader, buffer) is PARKED
    assert getattr(served.reader, splits) is None
    assert served.reader.at_eof()


# --- canaries: prometheus-client --------------------------------------------------------------


def _histogram() -> Histogram:
    family = Histogram("h_seconds", "h", ["m"], buckets=(0.1, 1), registry=CollectorRegistry())
    return family.labels("x")


@pytest.mark.parametrize("name", prometheus_private.HISTOGRAM_PARTS)
def test_a_histogram_child_still_has(name: str) -> None:
    assert hasattr(_histogram(), name), f"{PROMETHEUS}: Histogram.{name} is gone"


def test_a_batch_goes_into_the_buckets_without_observe_on_the_tested_release(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    child = _histogram()

    def no_observe(value: float) -> None:
        raise AssertionError(f"{PROMETHEUS}: histogram internals not as tested, observe used")

    monkeypatch.setattr(child, "observe", no_observe)
    batch_adder(child)([0.05, 0.1, 0.5, 3.0])
    assert _samples(child) == {"0.1": 2.0, "1.0": 3.0, "+Inf": 4.0, "count": 4.0, "sum": 3.65}


@pytest.mark.parametrize("kind", [Counter, Gauge, Histogram])
def test_kept_children_use_a_name_prometheus_client_does_not(kind: type[Any]) -> None:
    metric = kind("k", "k", ["m"], registry=CollectorRegistry())
    assert not hasattr(metric, prometheus_private.KEPT), (
        f"{PROMETHEUS} has {kind.__name__}.{prometheus_private.KEPT}"
    )
    assert metric.labels("a") is metric.labels("a"), f"{PROMETHEUS}: labels() builds new children"


# --- fallbacks ----------------------------------------------------------------------------------


@pytest.fixture
def taps(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """What `plain_writer` answered for each stream the relay tried to tap."""
    answers: list[object] = []

    def spied(resp: web.StreamResponse) -> object:
        answers.append(found := plain_writer(resp))
        return found

    monkeypatch.setattr(relay_tap, "plain_writer", spied)
    return answers


def _renamed(name: str) -> str:
    return f"{name}_renamed_by_a_release"


GONE = {
    "payload_writer": ("PAYLOAD_WRITER", _renamed(aiohttp_private.PAYLOAD_WRITER)),
    "headers_buf": (
        "PLAIN_WRITER",
        {**aiohttp_private.PLAIN_WRITER, "_headers_buf_renamed_by_a_release": None},
    ),
    "output_size": ("WRITER_USED", (*aiohttp_private.WRITER_USED, _renamed("output_size"))),
    "paused": ("PROTOCOL_PAUSED", _renamed(aiohttp_private.PROTOCOL_PAUSED)),
}


async def test_with_aiohttp_internals_as_tested_streams_take_the_fast_path(
    upstream: FakeUpstream, taps: list[object]
) -> None:
    pieces = [EVENT] * 20 + [DONE]
    assert await _relayed(upstream, pieces) == b"".join(pieces)
    assert taps and all(found is not None for found in taps)


@pytest.mark.parametrize("gone", list(GONE))
async def test_without_an_aiohttp_internal_the_relay_keeps_its_loop_and_every_byte(
    upstream: FakeUpstream, taps: list[object], monkeypatch: pytest.MonkeyPatch, gone: str
) -> None:
    constant, renamed = GONE[gone]
    monkeypatch.setattr(aiohttp_private, constant, renamed)
    monkeypatch.setattr(aiohttp_private, "_CHECKED", {})  # what it found per class: as new
    pieces = [EVENT] * 20 + [DONE]
    assert await _relayed(upstream, pieces) == b"".join(pieces)
    assert taps and all(found is None for found in taps)


async def test_without_the_head_switch_the_head_goes_out_alone_and_the_bytes_are_the_same(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aiohttp_private, "SEND_HEADERS_IMMEDIATELY", _renamed("switch"))

    @head_with_first_write
    class Unswitched(web.StreamResponse):
        pass

    assert Unswitched._send_headers_immediately is True  # left as aiohttp has it
    monkeypatch.setattr(HeadWithFirstWrite, "_send_headers_immediately", True)
    pieces = [EVENT] * 3 + [DONE]
    assert await _relayed(upstream, pieces) == b"".join(pieces)


async def test_without_the_reader_slots_a_body_is_not_parked_and_still_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        aiohttp_private, "READER_BUFFERS", tuple(map(_renamed, aiohttp_private.READER_BUFFERS))
    )
    readers: list[StreamReader] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        park_buffer(request.content)
        readers.append(request.content)
        return web.Response(body=body)

    assert await _serve_once(handler, b"hello") == b"hello"
    [reader] = readers
    assert reader._buffer is not PARKED


def test_without_histogram_internals_a_batch_is_observed_one_value_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = random.Random(3)
    values = [0.1, 1.0, 0.0, 9.0] + [rng.uniform(0, 2) for _ in range(200)]
    expected = _histogram()
    for value in values:
        expected.observe(value)
    monkeypatch.setattr(
        prometheus_private, "HISTOGRAM_PARTS", ("_upper_bounds", _renamed("_buckets"), "_sum")
    )
    child = _histogram()
    observed: list[float] = []
    observe = child.observe

    def counted(value: float) -> None:
        observed.append(value)
        observe(value)

    monkeypatch.setattr(child, "observe", counted)
    batched = BatchedObserver(child, batch=64)
    for value in values:
        batched.observe(value)
    batched.flush()
    assert observed == values
    assert _samples(child) == pytest.approx(_samples(expected), rel=1e-12)


async def _relayed(upstream: FakeUpstream, pieces: list[bytes]) -> bytes:
    """What a client of the gateway got for an upstream sending `pieces` (status 200)."""
    upstream.scripts.append(Script(pieces, pause_s=0.002))
    async with running_gateway(settings_for(upstream.base_url)) as gw:
        raw = await _exchange(gw.url, pause_s=0)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    return _dechunk(body)


def _samples(child: Histogram) -> dict[str, float]:
    """The child's cumulative buckets by `le`, its count and its sum."""
    out: dict[str, float] = {}
    for family in child.collect():
        for sample in family.samples:
            suffix = sample.name.rpartition("_")[2]
            if suffix == "bucket":
                out[sample.labels["le"]] = sample.value
            elif suffix in ("count", "sum"):
                out[suffix] = sample.value
    return out


# --- the fence ----------------------------------------------------------------------------------

FENCED = frozenset(
    {
        aiohttp_private.PAYLOAD_WRITER,
        *(name for name in aiohttp_private.PLAIN_WRITER if name.startswith("_")),
        aiohttp_private.PROTOCOL_PAUSED,
        aiohttp_private.SEND_HEADERS_IMMEDIATELY,
        *aiohttp_private.READER_BUFFERS,
        "_kwargs",
        "SERVER_SOFTWARE",
        *prometheus_private.HISTOGRAM_PARTS,
    }
)
ADAPTERS = {"aiohttp_private.py", "prometheus_private.py"}
#: `Tap.deliver` reads the flow-control flag per event as a plain attribute (no call)
ALLOWED = {("relay_tap.py", "self._client._paused")}


def test_only_the_adapters_touch_the_dependencies_private_names() -> None:
    package = Path(__file__).parents[2] / "gateway"
    found: set[tuple[str, str]] = set()
    for path in package.rglob("*.py"):
        if path.name in ADAPTERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in FENCED:
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue  # the module's own attribute of that name
                found.add((path.name, ast.unparse(node)))
            elif isinstance(node, ast.ClassDef):
                for item in node.body:
                    targets = item.targets if isinstance(item, ast.Assign) else []
                    for target in targets:
                        if isinstance(target, ast.Name) and target.id in FENCED:
                            found.add((path.name, f"{node.name}.{target.id}"))
    assert found == ALLOWED
