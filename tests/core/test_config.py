"""Configuration is validated once at start-up; every error names the file and the key."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, default_settings, parse_settings

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
        ("listen: [", "not valid YAML"),
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
