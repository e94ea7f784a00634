"""Budgets and keys at admission, through a real gateway and the official SDK.

A spent budget is refused with OpenAI's `insufficient_quota` (429, Retry-After until the
period resets, `x-should-retry: false`); a key's own limits refuse that key alone; a reload
applies new budgets and keys at once and keeps the spend so far.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
import yaml

from gateway.app_state import COMPONENTS
from gateway.config import Budgets, Limits, Team, TeamKey, TeamLimits, load_settings
from gateway.reload import Reloader
from gateway.spend_store import read_state_file
from tests.e2e_accounting.helpers import (
    MESSAGES,
    Observed,
    client,
    eventually,
    observed_gateway,
    request_lines,
    sim_settings,
)
from tests.support.clients import async_openai

from .processes import sim_config

SEARCH_KEY, CI_KEY, ADS_KEY, MAPS_KEY = "sk-search-1", "sk-search-ci", "sk-ads-1", "sk-maps-1"
CI = TeamKey(name="ci-bot", key=CI_KEY, limits=TeamLimits(requests_per_minute=1))


def teams(search_budgets: Budgets | None = None, ci: TeamKey = CI) -> tuple[Team, ...]:
    return (
        Team(name="search", keys=(SEARCH_KEY, ci), budgets=search_budgets or Budgets(),
             limits=TeamLimits(requests_per_minute=100)),
        Team(name="ads", keys=(ADS_KEY,), budgets=Budgets(usd_per_month=5)),
        Team(name="maps", keys=(TeamKey(name="maps-app", key=MAPS_KEY),)),
    )  # fmt: skip


async def one_stream(o: Observed, key: str, chunks: int = 4, delay_ms: float = 0) -> None:
    """One streamed chat completion through the SDK, read to its end (raises its errors)."""
    sdk = await client(o.gw.base_url, key=key)
    try:
        answer = await sdk.chat.completions.create(
            model="sim-x",
            messages=MESSAGES,
            stream=True,
            extra_body={"sim": {"chunks": chunks, "delay_ms": delay_ms}},
        )
        async for _ in answer:
            pass
    finally:
        await sdk.close()


async def settled(o: Observed, count: int) -> None:
    await eventually(lambda: len(request_lines(o.logs)) >= count)


async def test_a_spent_budget_is_insufficient_quota_and_the_sdk_does_not_retry_it() -> None:
    settings = sim_settings(teams=teams(Budgets(tokens_per_day=10)))
    async with observed_gateway(settings) as o:
        await one_stream(o, SEARCH_KEY, chunks=12)  # admitted with budget left, ends over it
        await settled(o, 1)
        sdk = await async_openai(o.gw.base_url, SEARCH_KEY, max_retries=3)
        with pytest.raises(openai.RateLimitError) as raised:
            await sdk.chat.completions.create(model="sim-x", messages=MESSAGES)
        await sdk.close()
        await settled(o, 2)
        error = raised.value
        assert error.code == "insufficient_quota" and error.type == "insufficient_quota"
        assert "tokens_per_day" in error.message and "resets at" in error.message
        assert error.response.headers["x-should-retry"] == "false"
        assert int(error.response.headers["Retry-After"]) >= 1
        lines = request_lines(o.logs)
        assert len(lines) == 2  # one refusal: the SDK asked once
        assert lines[1]["end"] == "limit" and lines[1]["status"] == 429
        assert o.gw.metric("gateway_rate_limited_total", team="search", limit="budget") == 1
        ratio = o.gw.metric(
            "gateway_budget_used_ratio", team="search", key="none", budget="tokens_per_day"
        )
        assert ratio == (lines[0]["prompt_tokens"] + lines[0]["completion_tokens"]) / 10
        # the rest of the team's keys share the team's budget; another team is untouched
        with pytest.raises(openai.RateLimitError):
            await one_stream(o, CI_KEY)
        await one_stream(o, ADS_KEY)


async def test_a_key_with_a_lower_rpm_is_refused_alone_and_its_teammates_are_not() -> None:
    async with observed_gateway(sim_settings(teams=teams())) as o:
        await one_stream(o, CI_KEY)
        with pytest.raises(openai.RateLimitError) as raised:
            await one_stream(o, CI_KEY)
        assert raised.value.code == "rate_limit_exceeded"
        for _ in range(3):
            await one_stream(o, SEARCH_KEY)  # the team's plain key: 100 a minute
        await settled(o, 5)
        keys = [(line["key"], line["status"]) for line in request_lines(o.logs)]
        assert keys == [("ci-bot", 200), ("ci-bot", 429), (None, 200), (None, 200), (None, 200)]
        assert o.gw.metric("gateway_rate_limited_total", team="search", limit="requests") == 1


async def usage_of(session: aiohttp.ClientSession, url: str, key: str | None) -> tuple[int, Any]:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    async with session.get(f"{url}/gateway/usage", headers=headers) as resp:
        return resp.status, await resp.json()


async def test_usage_shows_the_callers_own_team_and_key_and_never_another_team() -> None:
    async with observed_gateway(sim_settings(teams=teams())) as o:
        for key in (SEARCH_KEY, CI_KEY, ADS_KEY, MAPS_KEY):
            await one_stream(o, key)
        await settled(o, 4)
        by_key = {(line["team"], line["key"]): line for line in request_lines(o.logs)}
        async with aiohttp.ClientSession() as session:
            status, _ = await usage_of(session, o.gw.url, None)
            assert status == 401
            status, _ = await usage_of(session, o.gw.url, "sk-nobody")
            assert status == 401
            views = {}
            for key in (SEARCH_KEY, CI_KEY, ADS_KEY, MAPS_KEY):
                status, views[key] = await usage_of(session, o.gw.url, key)
                assert status == 200
    names = {SEARCH_KEY: "search", CI_KEY: "search", ADS_KEY: "ads", MAPS_KEY: "maps"}
    for key, view in views.items():
        others = {"search", "ads", "maps", "ci-bot", "maps-app"} - {names[key], view["key"]}
        text = msgspec.json.encode(view).decode()
        assert view["team"] == names[key]
        assert not any(f'"{other}"' in text for other in others), (key, text)
    search = by_key[("search", None)], by_key[("search", "ci-bot")]
    team_tokens = sum(line["prompt_tokens"] + line["completion_tokens"] for line in search)
    assert views[SEARCH_KEY]["team_usage"]["day"]["tokens"] == team_tokens
    assert views[SEARCH_KEY]["key_usage"] is None
    ci = views[CI_KEY]
    assert ci["key"] == "ci-bot" and ci["team_usage"]["month"]["tokens"] == team_tokens
    ci_line = by_key[("search", "ci-bot")]
    assert (
        ci["key_usage"]["day"]["tokens"] == ci_line["prompt_tokens"] + ci_line["completion_tokens"]
    )
    ads = views[ADS_KEY]["team_usage"]["month"]["budgets"]["usd_per_month"]
    assert ads == {"limit": 5, "remaining": 5}  # no pricing table: nothing costs anything


async def test_a_reload_raises_a_budget_at_once_removes_a_key_at_once_and_keeps_spend(
    tmp_path: Path,
) -> None:
    raw = sim_config({}, {"tokens_per_month": 5})
    raw["teams"][0]["keys"] = [SEARCH_KEY, {"name": "ci-bot", "key": CI_KEY}]
    path = tmp_path / "gateway.yaml"
    await asyncio.to_thread(path.write_text, yaml.safe_dump(raw))
    settings = await asyncio.to_thread(load_settings, path)
    async with observed_gateway(settings) as o:
        await one_stream(o, SEARCH_KEY)
        await settled(o, 1)
        with pytest.raises(openai.RateLimitError):
            await one_stream(o, CI_KEY)
        raw["teams"][0]["budgets"] = {"tokens_per_month": 10_000}
        raw["teams"][0]["keys"] = [SEARCH_KEY]
        await asyncio.to_thread(path.write_text, yaml.safe_dump(raw))
        assert await Reloader(o.gw.runner, path).reload()
        await one_stream(o, SEARCH_KEY)  # the raised budget admits at once
        with pytest.raises(openai.AuthenticationError):
            await one_stream(o, CI_KEY)  # the removed key is refused at once
        await settled(o, 4)
        spent = sum(
            line["prompt_tokens"] + line["completion_tokens"] for line in request_lines(o.logs)
        )
        book = o.gw.runner.app[COMPONENTS].spend
        now = book.periods.now()
        assert book.store.known(f"team:search|{now.month.id}")[0] == spent  # spend kept


async def test_a_stream_over_budget_is_cut_with_cut_and_charged_what_was_counted() -> None:
    settings = sim_settings(teams=teams(Budgets(tokens_per_day=20)))
    settings = msgspec.structs.replace(settings, limits=Limits(on_token_budget_exceeded="cut"))
    async with observed_gateway(settings) as o:
        with pytest.raises(openai.APIError) as raised:
            await one_stream(o, SEARCH_KEY, chunks=200, delay_ms=10)
        assert raised.value.code == "token_budget_exceeded"
        await settled(o, 1)
        (line,) = request_lines(o.logs)
        assert line["end"] == "limit" and line["completion_tokens"] < 200
        book = o.gw.runner.app[COMPONENTS].spend
        day = book.periods.now().day.id
        spent = line["prompt_tokens"] + line["completion_tokens"]
        assert book.store.known(f"team:search|{day}")[0] == spent


async def test_a_keys_own_budget_refuses_that_key_alone() -> None:
    ci = TeamKey(name="ci-bot", key=CI_KEY, budgets=Budgets(tokens_per_day=5))
    async with observed_gateway(sim_settings(teams=teams(ci=ci))) as o:
        await one_stream(o, CI_KEY)
        with pytest.raises(openai.RateLimitError) as raised:
            await one_stream(o, CI_KEY)
        assert raised.value.code == "insufficient_quota"
        assert "(team search, key ci-bot)" in raised.value.message
        await one_stream(o, SEARCH_KEY)  # the team's budget is not the key's
        ratio = o.gw.metric(
            "gateway_budget_used_ratio", team="search", key="ci-bot", budget="tokens_per_day"
        )
        assert ratio > 1


async def test_a_reload_that_sets_the_first_budget_keeps_the_spend_so_far_in_the_state_file(
    tmp_path: Path,
) -> None:
    raw = sim_config({"state_file": str(tmp_path / "state.db")}, {})
    raw["teams"][0]["keys"] = [SEARCH_KEY]
    path = tmp_path / "gateway.yaml"
    await asyncio.to_thread(path.write_text, yaml.safe_dump(raw))
    async with observed_gateway(await asyncio.to_thread(load_settings, path)) as o:
        await one_stream(o, SEARCH_KEY)
        await settled(o, 1)
        (line,) = request_lines(o.logs)
        spent = line["prompt_tokens"] + line["completion_tokens"]
        assert not await asyncio.to_thread((tmp_path / "state.db").exists)  # no budget: no file
        day = f"team:search|{o.gw.components.spend.periods.now().day.id}"
        raw["teams"][0]["budgets"] = {"tokens_per_day": spent}
        await asyncio.to_thread(path.write_text, yaml.safe_dump(raw))
        assert await Reloader(o.gw.runner, path).reload()
        with pytest.raises(openai.RateLimitError):
            await one_stream(o, SEARCH_KEY)  # the spend before the budget counts
    totals = await asyncio.to_thread(read_state_file, tmp_path / "state.db")
    assert totals[day][0] == spent
