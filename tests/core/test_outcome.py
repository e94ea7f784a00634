"""How a request ended is decided once, from the facts the data path reported.

`gateway.outcome.decide` is the one owner of `end`, `status`, `error_code` and
`finish_reason`; these tests pin each ending it gives, and the end-to-end tests elsewhere
(named in each case's comment) pin that the data path reports the facts behind it.
"""

from __future__ import annotations

import orjson
import pytest
from structlog.testing import capture_logs

from gateway.context import RequestContext
from gateway.errors import (
    BadRequest,
    GatewayError,
    RateLimitExceeded,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.outcome import CLIENT_CLOSED_REQUEST, Ending, conclude, decide
from tests.core.conftest import settings_for
from tests.core.test_errors_and_failover import CHAT, post
from tests.reliability.helpers import request_line
from tests.support.fake_upstream import FakeUpstream, Script
from tests.support.gateway import running_gateway


def ctx(**facts: object) -> RequestContext:
    context = RequestContext(request_id="r", started=0.0)
    for name, value in facts.items():
        setattr(context, name, value)
    return context


SHUTDOWN = ServiceUnavailable("shut down", code="gateway_shutdown")
BUDGET_CUT = RateLimitExceeded("over", code="token_budget_exceeded")
TRUNCATED = UpstreamError("cut short", code="upstream_truncated", reason="truncated")

#: each ending, from the facts that lead to it (and the end-to-end test that reports them)
CASES: dict[str, tuple[RequestContext, Ending]] = {
    # test_sdk_clients: a whole answer relayed
    "completed stream": (
        ctx(sent_status=200, metered_finish="stop"),
        Ending("completed", 200, None, "stop"),
    ),
    # test_client_faults: malformed JSON answered 400 by the errors middleware
    "bad request": (
        ctx(error=BadRequest("bad JSON")),
        Ending("rejected", 400, "invalid_request", None),
    ),
    # test_client_faults: a body too slow
    "request timeout": (
        ctx(error=BadRequest("slow", code="request_timeout", status=408)),
        Ending("rejected", 408, "request_timeout", None),
    ),
    # test_streams_and_queue: max_inflight's queue timed out
    "gateway overloaded": (
        ctx(error=ServiceUnavailable("full", code="gateway_overloaded")),
        Ending("limit", 503, "gateway_overloaded", None),
    ),
    # test_auth / test_exactness: a team limit refused it
    "rate limited": (
        ctx(error=RateLimitExceeded("429")),
        Ending("limit", 429, "rate_limit_exceeded", None),
    ),
    # test_redis_outage: fail_closed with the backend down
    "limits unavailable": (
        ctx(error=ServiceUnavailable("down", code="limits_unavailable")),
        Ending("limit", 503, "limits_unavailable", None),
    ),
    # test_token_budget: cut mid-stream at the budget
    "budget cut": (
        ctx(sent_status=200, error=BUDGET_CUT),
        Ending("limit", 200, "token_budget_exceeded", None),
    ),
    # test_upstream_faults: unreachable upstream before the first byte
    "upstream unreachable": (
        ctx(error=UpstreamError("unreachable")),
        Ending("upstream_error", 502, "upstream_error", None),
    ),
    # test_upstream_faults: silent upstream
    "upstream timeout": (
        ctx(error=UpstreamTimeout("silent")),
        Ending("upstream_error", 504, "upstream_timeout", None),
    ),
    # test_upstream_faults: the stream broke mid-way, after its 200 went out
    "stream cut short": (
        ctx(sent_status=200, error=TRUNCATED, metered_finish=None),
        Ending("upstream_error", 200, "upstream_truncated", None),
    ),
    # test_upstream_4xx_is_logged_as_refused_with_the_upstreams_code (below)
    "upstream refused": (
        ctx(sent_status=400, upstream_refused=True, upstream_code="invalid_value"),
        Ending("upstream_refused", 400, "invalid_value", None),
    ),
    # test_disconnect: the client left mid-stream
    "client left mid-stream": (
        ctx(sent_status=200, client_left=True),
        Ending("client_disconnect", 200, None, None),
    ),
    # test_disconnect: the client left before any answer
    "client left before the answer": (
        ctx(client_left=True),
        Ending("client_disconnect", CLIENT_CLOSED_REQUEST, None, None),
    ),
    # test_shutdown: the drain's grace ran out mid-stream
    "cut by the drain mid-stream": (
        ctx(sent_status=200, error=SHUTDOWN),
        Ending("rejected", 200, "gateway_shutdown", None),
    ),
    # test_shutdown: cut by the drain before any byte (answered 503)
    "cut by the drain before the answer": (
        ctx(error=SHUTDOWN),
        Ending("rejected", 503, "gateway_shutdown", None),
    ),
    # test_client_faults: an unhandled exception answered 500
    "internal error": (
        ctx(error=GatewayError("boom")),
        Ending("rejected", 500, "internal_error", None),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_ending_follows_from_the_facts_reported(case: str) -> None:
    facts, ending = CASES[case]
    assert decide(facts) == ending


def test_a_shutdown_cut_is_not_taken_for_a_client_that_left() -> None:
    assert decide(ctx(error=SHUTDOWN, client_left=True)).end == "rejected"


def test_a_client_that_left_is_a_disconnect_even_after_an_upstream_error() -> None:
    """The client gone is what the operator must see; the upstream error is counted apart."""
    assert decide(ctx(sent_status=200, error=TRUNCATED, client_left=True)).end == (
        "client_disconnect"
    )


def test_conclude_records_the_decision_on_the_context() -> None:
    facts = ctx(sent_status=200, error=BUDGET_CUT, metered_finish="length")
    ending = conclude(facts)
    assert (facts.end, facts.status, facts.error_code, facts.finish_reason) == (
        ending.end,
        ending.status,
        ending.error_code,
        ending.finish_reason,
    )
    assert ending == Ending("limit", 200, "token_budget_exceeded", "length")


@pytest.mark.parametrize(
    ("error", "code"),
    [
        ({"message": "bad temperature", "type": "invalid_request_error", "code": "x1"}, "x1"),
        ({"message": "no code", "type": "invalid_request_error"}, None),
    ],
)
async def test_upstream_4xx_is_logged_as_refused_with_the_upstreams_code(
    upstream: FakeUpstream, error: dict[str, str], code: str | None
) -> None:
    """An upstream's own 4xx passed on is the upstream refusing, not failing: the log line
    says so and carries the code its OpenAI-shaped body named."""
    answer = orjson.dumps({"error": error})
    upstream.scripts.append(Script([answer], status=404, content_type="application/json"))
    async with running_gateway(settings_for(upstream.base_url)) as gw:
        with capture_logs() as logs:
            status, _, body = await post(gw, CHAT)
            line = await request_line(logs)
        failures = [
            sample
            for family in gw.registry.collect()
            for sample in family.samples
            if sample.name == "gateway_upstream_errors_total"
        ]
    assert failures == []  # refused, not failed: no upstream error counted
    assert (status, body) == (404, answer)
    assert (line["end"], line["status"], line["error_code"]) == ("upstream_refused", 404, code)
