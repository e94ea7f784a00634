"""Other /v1/* paths pass through to the routed upstream: by the body's model, else the first."""

from __future__ import annotations

import aiohttp

from gateway.config import Route, Settings, Upstream
from tests.support.fake_upstream import FakeUpstream, Script, fake_upstream
from tests.support.gateway import running_gateway

ANSWER = b'{"object": "list", "data": []}'


def two_routes(first: FakeUpstream, second: FakeUpstream) -> Settings:
    return Settings(
        upstreams={
            "a": Upstream(base_url=first.base_url, api_key="key-a"),
            "b": Upstream(base_url=second.base_url, api_key="key-b"),
        },
        routes=(
            Route(models=("alpha-*",), upstreams=("a",)),
            Route(models=("beta-*",), upstreams=("b",)),
        ),
    )


async def test_embeddings_go_to_the_route_of_their_model() -> None:
    async with fake_upstream() as first, fake_upstream() as second:
        second.scripts.append(Script([ANSWER], content_type="application/json"))
        async with (
            running_gateway(two_routes(first, second)) as gw,
            aiohttp.ClientSession() as session,
            session.post(f"{gw.base_url}/embeddings", json={"model": "beta-1", "input": "hi"}) as r,
        ):
            assert (r.status, await r.read()) == (200, ANSWER)
        assert first.received == []
        assert second.received[0].path == "/v1/embeddings"
        assert second.received[0].headers["Authorization"] == "Bearer key-b"


async def test_a_path_without_a_model_goes_to_the_first_upstream_with_its_query() -> None:
    async with fake_upstream() as first, fake_upstream() as second:
        first.scripts.append(Script([ANSWER], content_type="application/json"))
        async with (
            running_gateway(two_routes(first, second)) as gw,
            aiohttp.ClientSession() as session,
            session.get(f"{gw.base_url}/files?purpose=batch&limit=2") as r,
        ):
            assert (r.status, await r.read()) == (200, ANSWER)
        assert second.received == []
        seen = first.received[0]
        assert (seen.method, seen.path, seen.query) == ("GET", "/v1/files", "purpose=batch&limit=2")


async def test_an_other_path_with_a_model_follows_that_models_route() -> None:
    async with fake_upstream() as first, fake_upstream() as second:
        second.scripts.append(Script([ANSWER], content_type="application/json"))
        async with (
            running_gateway(two_routes(first, second)) as gw,
            aiohttp.ClientSession() as session,
            session.post(f"{gw.base_url}/responses", json={"model": "beta-2", "input": "x"}) as r,
        ):
            assert r.status == 200
        assert [rec.path for rec in second.received] == ["/v1/responses"]
