"""What the simulator refuses: malformed requests get OpenAI-shaped errors."""

from __future__ import annotations

import io
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.sim import RunningSim

from .helpers import chat, gateway_prompt


async def error_of(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    body = await resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


@pytest.mark.parametrize("path", ["/chat/completions", "/completions", "/embeddings"])
async def test_a_body_that_is_not_json_is_a_400(
    session: aiohttp.ClientSession, sim: RunningSim, path: str
) -> None:
    async with session.post(sim.base_url + path, data=b"{not json") as resp:
        assert resp.status == 400
        error = await error_of(resp)
    assert error["type"] == "invalid_request_error"
    assert "parse the JSON body" in error["message"]


async def test_a_json_body_that_is_not_an_object_is_a_400(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    async with session.post(sim.base_url + "/chat/completions", json=[1, 2]) as resp:
        assert resp.status == 400
        await error_of(resp)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "model"),
        ({"model": "sim-small"}, "messages"),
        (chat(n=0), "n"),
        (chat(n="2"), "n"),
    ],
)
async def test_missing_or_bad_fields_name_their_param(
    session: aiohttp.ClientSession, sim: RunningSim, body: dict[str, Any], param: str
) -> None:
    async with session.post(sim.base_url + "/chat/completions", json=body) as resp:
        assert resp.status == 400
        assert (await error_of(resp))["param"] == param


@pytest.mark.parametrize(
    ("sim_field", "named"),
    [
        ({"chunkz": 3}, "chunkz"),
        ({"chunks": "many"}, "$.chunks"),
        ({"chunks": -1}, "$.chunks"),
        ({"fault": "meltdown"}, "$.fault"),
        ({"status": 200}, "$.status"),
        ([1], "must be a JSON object"),
    ],
)
async def test_bad_steering_is_a_400_naming_the_key(
    session: aiohttp.ClientSession, sim: RunningSim, sim_field: Any, named: str
) -> None:
    async with session.post(sim.base_url + "/chat/completions", json=chat(sim=sim_field)) as resp:
        assert resp.status == 400
        assert named in (await error_of(resp))["message"]


async def test_an_x_sim_header_that_is_not_json_is_a_400(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    url = sim.base_url + "/chat/completions"
    async with session.post(url, json=chat(), headers={"x-sim": "{chunks: 3}"}) as resp:
        assert resp.status == 400
        assert "x-sim" in (await error_of(resp))["message"]


async def test_unknown_path_and_wrong_method_answer_in_openai_shape(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    async with session.post(sim.base_url + "/nope", json={}) as resp:
        assert resp.status == 404
        await error_of(resp)
    async with session.get(sim.base_url + "/chat/completions") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        await error_of(resp)


async def test_requests_larger_than_a_mebibyte_are_read(
    session: aiohttp.ClientSession, sim: RunningSim
) -> None:
    big = io.BytesIO(orjson.dumps(chat(messages=[{"role": "user", "content": "x" * 4_000_000}])))
    async with session.post(sim.base_url + "/chat/completions", data=big) as resp:
        assert resp.status == 200
        usage = (await resp.json())["usage"]
    assert usage["prompt_tokens"] == gateway_prompt(
        chat(messages=[{"role": "user", "content": "x" * 4_000_000}])
    )
