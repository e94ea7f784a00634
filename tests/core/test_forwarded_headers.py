"""The request headers an upstream gets (`UpstreamClient.headers_for`): the client's, in their
order and spelling, less the hop-by-hop ones, the client's credentials and the ones the
`Connection` header nominates; then `Accept-Encoding: identity`, the request id and the
upstream's own key. The same from aiohttp's headers (a multidict) as from a plain mapping."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import Upstream
from gateway.upstream import UpstreamClient, create_client

CLIENT = [
    ("Host", "gateway.example"),
    ("Content-Type", "application/json"),
    ("connection", "keep-alive, X-Internal-Route"),
    ("X-Internal-Route", "admin"),
    ("User-Agent", "OpenAI/Python 1.0"),
    ("Authorization", "Bearer client-secret"),
    ("Connection", " x-OTHER-hop ,,"),
    ("X-Other-Hop", "1"),
    ("Accept-Encoding", "gzip"),
    ("X-Request-Id", "client-chosen"),
    ("Content-Length", "12"),
    ("X-Stainless-Lang", "python"),
]
FORWARDED = [
    ("Content-Type", "application/json"),
    ("User-Agent", "OpenAI/Python 1.0"),
    ("X-Stainless-Lang", "python"),
    ("Accept-Encoding", "identity"),
    ("X-Request-Id", "req-1"),
]


def _client(api_key: str | None) -> UpstreamClient:
    return create_client(
        "up", Upstream(base_url="http://127.0.0.1:9", api_key=api_key), "http://127.0.0.1:9"
    )


def _as(kind: str) -> Mapping[str, str]:
    if kind == "aiohttp":  # what a request's `headers` is
        return CIMultiDictProxy(CIMultiDict(CLIENT))
    if kind == "multidict":
        return CIMultiDict(CLIENT)
    # a plain mapping keeps one value per name: both Connection lines as one
    plain = {k: v for k, v in CLIENT if k.lower() != "connection"}
    plain["Connection"] = "keep-alive, X-Internal-Route, x-OTHER-hop"
    return plain


@pytest.mark.parametrize("kind", ["aiohttp", "multidict", "mapping"])
def test_forwarded_headers_keep_the_clients_order_and_add_the_gateways_own(kind: str) -> None:
    assert _client(None).headers_for(_as(kind), "req-1") == FORWARDED


def test_the_upstreams_key_goes_last_and_the_clients_never() -> None:
    headers = _client("sk-upstream").headers_for(_as("aiohttp"), "req-1")
    assert headers == [*FORWARDED, ("Authorization", "Bearer sk-upstream")]


def test_what_one_connection_header_nominates_is_not_dropped_for_the_next_request() -> None:
    client = _client(None)
    nominating = CIMultiDict([("Connection", "X-A"), ("X-A", "1"), ("X-B", "2")])
    plain = CIMultiDict([("Connection", "keep-alive"), ("X-A", "1"), ("X-B", "2")])
    assert client.headers_for(nominating, "r")[:1] == [("X-B", "2")]
    assert client.headers_for(plain, "r")[:2] == [("X-A", "1"), ("X-B", "2")]
    assert client.headers_for({"X-A": "1"}, "r")[:1] == [("X-A", "1")]
