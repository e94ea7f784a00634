"""Configuration is validated once at start-up; every error names the file and the key."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from gateway.config import ConfigError, TokenizerName, default_settings, parse_settings
from gateway.tokens import TOKENIZER_NAMES, load_tokenizer

REPO = Path(__file__).resolve().parents[2]


def test_the_documented_example_loads() -> None:
    text = (REPO / "config" / "gateway.yaml").read_text()
    settings = parse_settings(text, {"HELPINGAI_API_KEY": "k"})
    assert settings.upstreams["helpingai"].api_key == "k"
    assert [team.name for team in settings.teams] == ["search", "support"]


def test_defaults_serve_the_simulator_without_auth() -> None:
    settings = default_settings()
    assert (settings.listen.host, settings.listen.port) == ("127.0.0.1", 8080)
    assert settings.upstreams["sim"].simulator is not None
    assert settings.routes[0].models == ("sim-*",)
    assert not settings.auth_enabled


def test_env_references_expand_with_defaults() -> None:
    text = "upstreams: {a: {base_url: '${URL}', api_key: '${KEY:-fallback}'}}"
    settings = parse_settings(text, {"URL": "http://x/v1"})
    assert settings.upstreams["a"].base_url == "http://x/v1"
    assert settings.upstreams["a"].api_key == "fallback"


UPSTREAM = "upstreams: {a: {base_url: 'http://x', %s}}"
ROUTE = "upstreams: {a: {base_url: 'http://x'}}\nroutes: [{models: [m], upstreams: [a], %s}]"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        (
            "upstreams: {a: {base_url: '${NOPE}'}}",
            "$.upstreams.a.base_url: environment variable NOPE",
        ),
        ("listen: {port: eighty}", "$.listen.port"),
        ("limits: {backend: memcached}", "$.limits.backend"),
        ("upstreams: {a: {base_url: 'http://x', colour: red}}", "colour"),
        ("routes: [{models: [x], upstreams: [missing]}]", "$.routes[0].upstreams"),
        ("upstreams: {a: {}}", "$.upstreams.a"),
        ("teams: [{name: t}]", "$.teams[0]"),
        ("teams: [{name: t, keys_sha256: [abc]}]", "$.teams[0].keys_sha256[0]"),
        ("limits: {max_inflight: 0}", "$.limits.max_inflight"),
        ("upstreams: {a: {base_url: 'http://x', max_connections: 0}}", "max_connections"),
        ("listen: [", "not valid YAML"),
        # every numeric bound, refused by msgspec with the key's path
        (UPSTREAM % "connect_timeout_s: 0", "$.upstreams.a.connect_timeout_s"),
        (UPSTREAM % "read_idle_timeout_s: -1", "$.upstreams.a.read_idle_timeout_s"),
        (UPSTREAM % "pool_timeout_s: -0.5", "$.upstreams.a.pool_timeout_s"),
        (ROUTE % "keepalive_comment_s: -1", "$.routes[0].keepalive_comment_s"),
        ("listen: {port: 70000}", "$.listen.port"),
        ("listen: {port: -1}", "$.listen.port"),
        ("upstreams: {s: {simulator: {chunks: -1}}}", "$.upstreams.s.simulator.chunks"),
        ("upstreams: {s: {simulator: {delay_ms: -5}}}", "$.upstreams.s.simulator.delay_ms"),
        ("teams: [{name: t, keys: [k], limits: {requests_per_minute: 0}}]", "$.teams[0].limits"),
        ("max_request_bytes: 0", "$.max_request_bytes"),
        ("client_idle_timeout_s: 0", "$.client_idle_timeout_s"),
        ("limits: {default_max_tokens: 0}", "$.limits.default_max_tokens"),
        ("limits: {write_stall_timeout_s: 0}", "$.limits.write_stall_timeout_s"),
        (
            "teams: [{name: t, keys: [k], model_limits: {gpt-4o: {concurrent_streams: 0}}}]",
            "$.teams[0].model_limits.gpt-4o.concurrent_streams",
        ),
    ],
)
def test_invalid_files_name_the_key(text: str, names: str) -> None:
    with pytest.raises(ConfigError, match=r"^gw\.yaml: .*" + re.escape(names)):
        parse_settings(text, {}, source="gw.yaml")


def test_the_command_line_refuses_an_invalid_file(tmp_path: Path) -> None:
    bad = tmp_path / "gateway.yaml"
    bad.write_text("listen: {port: eighty}\n")
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 2
    assert "listen.port" in done.stderr
    assert str(bad) in done.stderr


@pytest.mark.parametrize(
    "text",
    [
        "shutdown_grace_s: 0",
        "limits: {queue_timeout_s: 0}",
        "listen: {port: 0}",
        "upstreams: {s: {simulator: {chunks: 0, delay_ms: 0, ttft_ms: 0}}}",
        ROUTE % "keepalive_comment_s: 0",
    ],
)
def test_zero_is_accepted_where_it_means_something(text: str) -> None:
    parse_settings(text, {}, source="gw.yaml")


@pytest.mark.parametrize(
    ("text", "bound"),
    [("shutdown_grace_s: -1", ">= 0"), ("limits: {queue_timeout_s: -1}", ">= 0")],
)
def test_a_bound_that_allows_zero_is_not_called_positive(text: str, bound: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_settings(text, {}, source="gw.yaml")
    assert "positive" not in str(refused.value)
    assert bound in str(refused.value)


@pytest.mark.parametrize("name", get_args(TokenizerName))
def test_every_tokenizer_a_route_may_name_loads_and_is_listed(name: str) -> None:
    assert name in TOKENIZER_NAMES
    assert load_tokenizer(name).name == name
