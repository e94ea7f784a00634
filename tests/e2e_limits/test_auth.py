"""Gateway keys: who may call, which team they count against, and what goes upstream.

A request to `/v1/*` needs `Authorization: Bearer <gateway key>` when teams are configured;
a missing or wrong key is a 401 in OpenAI's shape and never reaches the upstream. The
upstream gets its own key, never the client's. With no teams, auth is off (and said so).
"""

from __future__ import annotations

import hashlib
from collections.abc import MutableMapping
from typing import Any

import openai
import pytest

from gateway.config import Team
from tests.support.clients import async_openai
from tests.support.gateway import running_gateway

from .held_upstream import held_upstream
from .helpers import (
    MESSAGES,
    TEAM,
    TEAM_KEY,
    TEST_LABEL,
    TEST_MODEL,
    UPSTREAM_KEY,
    Reply,
    auth,
    bulk_session,
    chat,
    post,
    team,
    upstream_settings,
)

BODY = chat(TEST_MODEL, stream=True)


def assert_openai_401(reply: Reply) -> None:
    assert reply.status == 401
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_api_key"
    assert error["message"]


@pytest.mark.parametrize(
    "headers",
    [{}, auth("sk-not-a-gateway-key"), {"Authorization": f"Basic {TEAM_KEY}"}],
    ids=["missing", "wrong", "not-bearer"],
)
async def test_a_missing_or_wrong_key_gets_an_openai_shaped_401(headers: dict[str, str]) -> None:
    async with held_upstream() as up, bulk_session() as session:
        up.release.set()
        async with running_gateway(upstream_settings(up.base_url, team())) as gw:
            assert_openai_401(await post(session, gw.url, BODY, headers))
            async with session.get(f"{gw.url}/v1/models", headers=headers) as resp:
                assert_openai_401(Reply(resp.status, resp.headers.copy(), await resp.read()))
        assert up.received == []


async def test_the_openai_sdk_raises_authentication_error_on_a_wrong_key() -> None:
    async with held_upstream() as up:
        async with running_gateway(upstream_settings(up.base_url, team())) as gw:
            client = await async_openai(gw.base_url, "sk-not-a-gateway-key", max_retries=0)
            async with client:
                with pytest.raises(openai.AuthenticationError) as raised:
                    await client.chat.completions.create(model=TEST_MODEL, messages=MESSAGES)
    assert raised.value.code == "invalid_api_key"


async def test_a_key_configured_as_its_sha256_digest_is_accepted() -> None:
    digest = hashlib.sha256(TEAM_KEY.encode()).hexdigest()
    hashed = Team(name=TEAM, keys_sha256=(digest.upper(),))
    async with held_upstream() as up, bulk_session() as session:
        up.release.set()
        async with running_gateway(upstream_settings(up.base_url, hashed)) as gw:
            assert (await post(session, gw.url, BODY, auth())).status == 200
            assert_openai_401(await post(session, gw.url, BODY, auth(digest)))
            counted = gw.metric(
                "gateway_requests_total", team=TEAM, model=TEST_LABEL, upstream="up", code="200"
            )
            assert counted == 1


async def test_the_client_key_never_reaches_the_upstream_nor_the_log(
    logs: list[MutableMapping[str, Any]],
) -> None:
    sneaky = {**auth(), "X-Api-Key": TEAM_KEY, "Api-Key": TEAM_KEY}
    async with held_upstream() as up, bulk_session() as session:
        up.release.set()
        async with running_gateway(upstream_settings(up.base_url, team())) as gw:
            assert (await post(session, gw.url, BODY, sneaky)).status == 200
            client = await async_openai(gw.base_url, TEAM_KEY, max_retries=0)
            async with client:
                await client.chat.completions.create(model=TEST_MODEL, messages=MESSAGES)
    assert len(up.received) == 2
    for headers in up.received:
        assert headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert not any(TEAM_KEY in value for value in headers.values())
    assert TEAM_KEY not in repr(logs)
    assert UPSTREAM_KEY not in repr(logs)


async def test_with_no_teams_auth_is_off_and_the_log_says_so(
    logs: list[MutableMapping[str, Any]],
) -> None:
    async with held_upstream() as up, bulk_session() as session:
        up.release.set()
        async with running_gateway(upstream_settings(up.base_url)) as gw:
            assert (await post(session, gw.url, BODY)).status == 200
            assert (await post(session, gw.url, BODY, auth("sk-anything"))).status == 200
            assert (
                gw.metric(
                    "gateway_requests_total",
                    team="anonymous",
                    model=TEST_LABEL,
                    upstream="up",
                    code="200",
                )
                == 2
            )
    assert [entry["event"] for entry in logs].count("auth_disabled") == 1


async def test_health_and_metrics_need_no_key_when_auth_is_on() -> None:
    async with held_upstream() as up, bulk_session() as session:
        async with running_gateway(upstream_settings(up.base_url, team())) as gw:
            for path in ("/healthz", "/readyz", "/metrics"):
                async with session.get(gw.url + path) as resp:
                    assert resp.status == 200, path
