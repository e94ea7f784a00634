"""The benchmark runs end to end at a tiny scale and writes the report its readers rely on.

The figures themselves are not asserted (timing belongs in the benchmark, not in tests); what
is pinned is that every scenario produces its row, that the bench's own client verified every
stream byte for byte, and that the JSON keeps the keys the README and the integrator use.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.http1 import ChunkedDecoder
from bench.sse import chunked_frames, expected_body

REPO = Path(__file__).resolve().parents[2]


def run_tiny_bench(out: Path) -> dict[str, Any]:
    """`python -m bench` against the direct target only, every scenario scaled down."""
    command = [
        sys.executable, "-m", "bench", "--no-pin", "--targets", "direct",
        "--scenarios", "paced,capacity,latency,slow",
        "--events", "20", "--paced-streams", "20", "--capacity-streams", "5",
        "--latency-streams", "5", "--slow-streams", "20", "--slow-hold", "0.5",
        "--warmup", "0.5", "--window", "1", "--out", str(out),
    ]  # fmt: skip
    subprocess.run(command, cwd=REPO, check=True, timeout=60, capture_output=True)
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def test_tiny_run_writes_every_scenario_with_exact_streams(tmp_path: Path) -> None:
    report = run_tiny_bench(tmp_path / "smoke.json")

    assert set(report) >= {"meta", "targets", "paced", "capacity", "latency", "slow", "failures"}
    assert report["failures"] == []
    assert report["targets"] == [{"name": "direct", "status": "ok", "detail": ""}]
    paced, paced_responses = report["paced"]
    assert (paced["api"], paced_responses["api"]) == ("chat", "responses")
    assert paced.keys() >= {"events_per_s", "proxy_cpu_us_per_event", "ratio_to_nginx"}
    assert paced["events_per_s"] > 0
    assert paced_responses["events_per_s"] > 0 and paced_responses["streams_exact"] > 0
    assert paced_responses["errors"] == {}
    (capacity,) = report["capacity"]
    assert capacity["events_per_s"] > 0
    (latency,) = report["latency"]
    assert latency["ttft_ms"].keys() == {"p50", "p99", "samples"}
    assert latency["added_ttft_ms"] == {"p50": 0.0, "p99": 0.0}  # direct against itself
    (slow,) = report["slow"]
    assert slow["completed_share"] == 1.0
    for row in (paced, capacity, latency, slow):
        assert row["errors"] == {}


def test_tiny_per_request_run_has_a_row_per_target_connection_and_call(tmp_path: Path) -> None:
    out = tmp_path / "per-request.json"
    command = [
        sys.executable, "-m", "bench", "--no-pin",
        "--targets", "direct,aiohttp-relay,gateway-team", "--scenarios", "first-byte,short-calls",
        "--first-byte-requests", "20", "--short-calls-concurrency", "4",
        "--request-rounds", "2",
        "--warmup", "0.3", "--window", "0.5", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, check=True, timeout=120, capture_output=True)
    report: dict[str, Any] = json.loads(out.read_text())

    assert report["failures"] == []
    assert [t["status"] for t in report["targets"]] == ["ok", "ok", "ok"]
    targets = ["direct", "aiohttp-relay", "gateway-team"]
    first_byte = {(r["target"], r["connection"]): r for r in report["first_byte"]}
    assert set(first_byte) == {(t, c) for t in targets for c in ("keep-alive", "new")}
    for (target, _), row in first_byte.items():
        assert row["errors"] == {}
        assert row["first_byte_ms"]["samples"] == 40  # 2 rounds of 20, none from the warm-up
        assert row["rounds"] == 2
        assert (row["proxy_cpu_us_per_request"] is None) == (target == "direct")
    assert first_byte["direct", "new"]["added_first_byte_ms"] == {"p50": 0.0, "p99": 0.0}
    short = {(r["target"], r["call"]): r for r in report["short_calls"]}
    assert set(short) == {(t, c) for t in targets for c in ("chat", "embeddings")}
    # direct has no CPU figure to repeat; the proxies ran a window per round
    assert [r["rounds"] for r in short.values()] == [1, 1, 2, 2, 2, 2]
    for row in short.values():
        assert row["errors"] == {}
        assert row["requests_per_s"] > 0  # answers checked byte for byte, behind a team key
    assert short["aiohttp-relay", "chat"]["per_core_vs_bare_relay"] == 1.0
    assert short["gateway-team", "embeddings"]["per_core_vs_bare_relay"] is not None
    printed = done.stdout.decode()
    assert "== First byte in ms, one sequential client" in printed
    assert "== Short non-streaming calls at saturation" in printed


@pytest.mark.parametrize("split", [1, 2, 3, 7, 64, 1000])
def test_chunked_decoder_reassembles_the_body_whatever_the_split(split: int) -> None:
    wire = b"".join(chunked_frames(8)) + b"0\r\n\r\n"
    decoder = ChunkedDecoder()
    pieces = [decoder.feed(wire[i : i + split]) for i in range(0, len(wire), split)]

    assert b"".join(b"".join(p) for p in pieces) == expected_body(8).body
    assert decoder.done
    assert decoder.tail == b""
