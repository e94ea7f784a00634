"""How a request ended: decided once, from what happened.

Every module that sees something happen reports it as a fact on the request's
`RequestContext` (the error the client was told about, the status that went out, the client
leaving, the upstream's own refusal, the finish reason the meter read). `decide` turns those
facts into the request's ending; the first middleware calls `conclude` once, in `finally`,
and records the metrics and the log line from it. A new kind of ending is one new case in
`_end` and its test.

    end                 when
    rejected            the gateway shut down under the request (gateway_shutdown, draining),
                        or refused it itself (400, 401, 404, 408, 413, pool exhausted, 500)
    client_disconnect   the client went away before its answer ended (or began)
    limit               a limit refused or cut it (LIMIT_CODES)
    upstream_error      an upstream failed: unreachable, reset, timed out, 5xx, an error event,
                        a stream cut short (the error names an upstream failure `reason`)
    upstream_refused    the upstream's own 4xx answer was passed on to the client
    completed           anything else
"""

from __future__ import annotations

from dataclasses import dataclass

from .context import End, RequestContext

#: the status logged and counted when the client left before a response began (nginx's 499)
CLIENT_CLOSED_REQUEST = 499
#: error codes that say the gateway itself stopped serving the request as it shut down
SHUTDOWN_CODES = frozenset({"gateway_shutdown", "draining"})
#: error codes of a limit's refusal or cut
LIMIT_CODES = frozenset(
    {
        "rate_limit_exceeded",
        "token_budget_exceeded",
        "gateway_overloaded",
        "limits_unavailable",
        "insufficient_quota",
    }
)


@dataclass(frozen=True, slots=True)
class Ending:
    end: End
    status: int
    error_code: str | None
    finish_reason: str | None


def decide(ctx: RequestContext) -> Ending:
    """The request's ending, from the facts reported on `ctx`."""
    error = ctx.error
    if ctx.sent_status:
        status = ctx.sent_status
    elif error is not None:
        status = error.status
    else:
        status = CLIENT_CLOSED_REQUEST if ctx.client_left else 0
    code = error.code if error is not None else ctx.upstream_code
    return Ending(_end(ctx), status, code, ctx.metered_finish)


def _end(ctx: RequestContext) -> End:
    error = ctx.error
    if error is not None and error.code in SHUTDOWN_CODES:
        return "rejected"
    if ctx.client_left:
        return "client_disconnect"
    if error is not None:
        if error.code in LIMIT_CODES:
            return "limit"
        return "upstream_error" if error.reason is not None else "rejected"
    if ctx.upstream_refused:
        return "upstream_refused"
    return "completed"


def conclude(ctx: RequestContext) -> Ending:
    """Decide the ending and record it on `ctx` (the only writer of these four fields)."""
    ending = decide(ctx)
    ctx.end = ending.end
    ctx.status = ending.status
    ctx.error_code = ending.error_code
    ctx.finish_reason = ending.finish_reason
    return ending
