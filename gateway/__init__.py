"""A multi-stream gateway for OpenAI-compatible chat APIs.

The data path, module by module, in the order a request crosses it:

    app             middlewares: request id, auth, drain; errors -> OpenAI-shaped JSON
    proxy           one request, start to end, calling in turn:
      request_parse   path, body (bounded in size and time), JSON, model
      routing         the model's route and its bounded metric label
      admission       max_inflight gate, prompt estimate, team limits (reservations)
      balancer        which upstream serves: tiers, balancing, passive health, pacing
      upstream        pools; the chosen upstream, retries and failover before the first byte
        upstream_http   keep-alive HTTP/1.1 connections (llhttp), idle/connect timeouts
      client_response the client's answer head (status, headers, SSE headers)
      relay           each upstream piece to the client as it arrives (awaited loop)
        relay_tap       the fast path: pieces written inside the upstream's read callback
      ledger          the relay's plan; live counts into metrics and limits; settlement
        pricing, spend  what it costs; budgets per team and key (spend_store, periods, debt)

A chunk goes: upstream socket -> upstream_http -> relay / relay_tap -> client socket, and a
copy goes relay_tap -> meter_batch -> meter (sse decoder, tokens) -> ledger (metrics, limits).
When the request ends, outcome decides how (end, status, error code, finish reason) from the
facts the modules reported on the RequestContext (context), and app records the metrics
(metrics) and the one log line (logs).

Private attributes of aiohttp and prometheus-client are read in aiohttp_private and
prometheus_private only, each with a fallback to the public API.

`python -m gateway` is a thin entry point over this library (server, workers, reload); tests
import it directly.
"""

__version__ = "0.1.0"
