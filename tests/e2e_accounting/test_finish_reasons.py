"""Finish reasons are counted per model label, one per choice, `none` when a stream has none."""

from __future__ import annotations

from typing import Any

from tests.e2e_accounting.helpers import (
    DONE,
    EXACT_MODEL,
    MESSAGES,
    PATTERN,
    Observed,
    chunk,
    client,
    eventually,
    fake_settings,
    observed_gateway,
    one_request_line,
    request_lines,
    sim_settings,
)
from tests.support.fake_upstream import Script, fake_upstream


async def stream(o: Observed, model: str, sim: dict[str, Any], n: int = 1) -> None:
    sdk = await client(o.gw.base_url)
    answer = await sdk.chat.completions.create(
        model=model, messages=MESSAGES, stream=True, n=n, extra_body={"sim": {"chunks": 2, **sim}}
    )
    async for _ in answer:
        pass
    await sdk.close()


def reasons(o: Observed) -> dict[tuple[str, str], float]:
    return {
        (sample.labels["model"], sample.labels["reason"]): sample.value
        for family in o.gw.registry.collect()
        for sample in family.samples
        if sample.name == "gateway_finish_reason_total"
    }


async def test_finish_reasons_are_counted_per_model_and_per_choice() -> None:
    async with observed_gateway(sim_settings()) as o:
        await stream(o, EXACT_MODEL, {})
        await stream(o, "sim-long", {"finish_reason": "length"})
        await stream(o, "sim-long", {"finish_reason": "length"})
        await stream(o, "sim-tools", {"finish_reason": "tool_calls"}, n=3)
        await stream(o, "sim-odd", {"finish_reason": "made_up_by_a_provider"})
        await eventually(lambda: len(request_lines(o.logs)) == 5)
        assert reasons(o) == {
            (EXACT_MODEL, "stop"): 1,
            (PATTERN, "length"): 2,
            (PATTERN, "tool_calls"): 3,
            (PATTERN, "other"): 1,
        }
        assert [line["finish_reason"] for line in request_lines(o.logs)] == [
            "stop",
            "length",
            "length",
            "tool_calls",
            "made_up_by_a_provider",
        ]


async def test_a_stream_that_ends_without_a_finish_reason_counts_as_none() -> None:
    async with fake_upstream() as up:
        up.scripts.append(Script([chunk("Hello"), chunk(" there"), DONE]))
        async with observed_gateway(fake_settings(up.base_url)) as o:
            sdk = await client(o.gw.base_url)
            answer = await sdk.chat.completions.create(
                model="test-model", messages=MESSAGES, stream=True
            )
            async for _ in answer:
                pass
            await sdk.close()
            line = await one_request_line(o.logs)
            assert line["finish_reason"] is None and line["end"] == "completed"
            assert reasons(o) == {("test-*", "none"): 1}
