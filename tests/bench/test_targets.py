"""The gateway targets' configurations, and `--base`: the same gateways from another checkout
in the same run (an A/B comparison taken minutes apart at most, as every other in a run)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.cli import build_targets, parser
from bench.targets import Env, Gateway
from gateway.config import parse_settings


def env(tmp_path: Path) -> Env:
    return Env(workdir=tmp_path, upstream_port=9, proxy_cpus=None, nofile=1024)


def test_base_runs_each_asked_gateway_again_from_each_other_checkout(tmp_path: Path) -> None:
    args = parser().parse_args(
        ["--targets", "nginx,gateway,gateway-noacct", "--base", "old=/a", "--base", "/b"]
    )
    targets = build_targets(args.targets, env(tmp_path), dict(args.base))
    names = [target.name for target in targets]

    assert names == [
        "nginx", "gateway", "gateway-noacct",
        "gateway@old", "gateway-noacct@old", "gateway@base", "gateway-noacct@base",
    ]  # fmt: skip
    cwd = {t.name: t._cwd for t in targets if isinstance(t, Gateway)}
    assert cwd["gateway@old"] == cwd["gateway-noacct@old"] == Path("/a")
    assert cwd["gateway@base"] == Path("/b")


def test_every_gateway_targets_configuration_is_valid(tmp_path: Path) -> None:
    names = ("gateway", "gateway-noacct", "gateway-team", "gateway-budget")
    for target in build_targets(names, env(tmp_path)):
        assert isinstance(target, Gateway)
        settings = parse_settings(json.dumps(target.config()), {})  # JSON is YAML
        assert settings.routes[0].accounting is (target.name != "gateway-noacct")
        if target.name == "gateway-budget":
            assert settings.budgets_enabled and settings.pricing
            assert target.api_key is not None
