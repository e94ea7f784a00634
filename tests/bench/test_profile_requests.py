"""`python -m bench.profile_requests` counts the gateway's calls per request, by layer."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_profile_lists_calls_per_request_by_layer_and_by_step() -> None:
    command = [sys.executable, "-m", "bench.profile_requests", "--requests", "20", "--team"]
    done = subprocess.run(command, cwd=REPO, check=True, timeout=120, capture_output=True)
    out = done.stdout.decode()

    assert "!!" not in out  # every answer came back byte-exact
    streams, calls = out.split("== (ii) 20 sequential non-streaming chat calls")
    assert "== (i) 20 sequential keep-alive streams of 3 events" in streams
    calls, new_connections = calls.split(
        "== (iii) 20 sequential streams of 3 events, a new connection each"
    )
    for part in (streams, calls, new_connections):
        layers = dict(
            (name, float(count))
            for count, name in re.findall(r"^ +([0-9.]+)  ([a-z_ ]+[a-z])$", part, re.M)
        )
        assert {"aiohttp server", "middlewares", "upstream", "structlog", "metrics"} <= set(layers)
        assert layers["admission"] > layers["routing"] > 0  # the team's limits are checked
        steps = dict(
            (name, float(count)) for count, name in re.findall(r"^ +([0-9.]+)  (\D.*)$", part, re.M)
        )
        assert steps["building the upstream request"] > 0
        assert steps["team limits: admit, usage headers, settle"] > 1
    batched = re.compile(r"gateway/meter_batch\.py:\d+ run$", re.M)
    assert batched.search(streams)  # a stream's pieces are metered in batches
    assert batched.search(new_connections)
    assert not batched.search(calls)  # a JSON answer is metered whole
