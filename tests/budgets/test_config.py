"""The configuration of keys, budgets and prices: what loads, and errors that name the key."""

from __future__ import annotations

import hashlib
import re

import pytest

from gateway.auth import Authenticator
from gateway.config import ConfigError, TeamKey, parse_settings
from gateway.errors import Unauthorized
from gateway.pricing import Pricing

ROUTES = """
upstreams: {sim: {simulator: {}}}
routes: [{models: ["sim-*"], upstreams: [sim]}]
"""


def test_keys_may_be_strings_or_named_keys_with_limits_and_budgets() -> None:
    digest = hashlib.sha256(b"sk-hashed").hexdigest()
    text = (
        ROUTES
        + f"""
teams:
  - name: search
    keys:
      - sk-plain
      - {{name: ci-bot, key: sk-ci, limits: {{requests_per_minute: 60}},
         budgets: {{usd_per_day: 20}}}}
      - {{name: batch, key_sha256: "{digest}"}}
    budgets: {{tokens_per_month: 1000}}
limits: {{budget_timezone: Europe/Berlin}}
"""
    )
    settings = parse_settings(text, {})
    team = settings.teams[0]
    assert settings.budgets_enabled and team.budgets.caps() == {"tokens_per_month": 1000}
    auth = Authenticator(settings)
    plain = auth.identify("Bearer sk-plain")
    assert plain is not None and (plain.team, plain.key) == (team, None)
    assert [s.id for s in plain.subjects] == ["team:search"]
    found = auth.identify("Bearer sk-ci")
    assert found is not None and isinstance(found.key, TeamKey)
    assert found.key.name == "ci-bot" and found.key.budgets.caps() == {"usd_per_day": 20}
    assert [s.id for s in found.subjects] == ["team:search", "team:search:key:ci-bot"]
    hashed = auth.identify("Bearer sk-hashed")
    assert hashed is not None and hashed.key is not None and hashed.key.name == "batch"
    with pytest.raises(Unauthorized):
        auth.identify("Bearer ci-bot")  # a key's name is not a key


def test_no_budget_anywhere_means_no_spend_is_stored() -> None:
    settings = parse_settings(ROUTES + "teams: [{name: a, keys: [k]}]", {})
    assert not settings.budgets_enabled


@pytest.mark.parametrize(
    ("teams", "names"),
    [
        ("[{name: a, keys: [{name: x, key: k1}, {name: x, key: k2}]}]", "$.teams[0].keys[1].name"),
        ("[{name: a, keys: [{name: x}]}]", "$.teams[0].keys[0]: set exactly one of key"),
        ("[{name: a, keys: [{name: 'no spaces', key: k}]}]", "$.teams[0].keys[0].name"),
        ("[{name: a, keys: [{name: x, key_sha256: nothex}]}]", "keys[0].key_sha256"),
        ("[{name: a, keys: [k], budgets: {usd_per_day: 0}}]", "$.teams[0].budgets.usd_per_day"),
        ("[{name: a, keys: [k, {name: x, key: k}]}]", "shared with another team"),
    ],
)
def test_invalid_keys_and_budgets_name_the_key(teams: str, names: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(names)):
        parse_settings(ROUTES + f"teams: {teams}", {}, source="gw.yaml")


def test_an_unknown_time_zone_names_the_key() -> None:
    with pytest.raises(ConfigError, match=re.escape("$.limits.budget_timezone")):
        parse_settings(ROUTES + "limits: {budget_timezone: Mars/Olympus}", {})


def test_the_first_price_that_matches_the_requested_model_wins() -> None:
    text = (
        ROUTES
        + """
pricing:
  - {models: ["sim-large"], input: 10, output: 30}
  - {models: ["sim-*"], input: 1, cached_input: 0.1, output: 2}
"""
    )
    pricing = Pricing(parse_settings(text, {}))
    large, small = pricing.rates_for("sim-large"), pricing.rates_for("sim-small")
    assert large is not None and small is not None
    assert large.cost(1_000_000, 0, 0) == pytest.approx(10)
    assert large.cached_input == large.input  # cached_input defaults to the input price
    assert small.cost(1_000_000, 400_000, 1_000_000) == pytest.approx(0.6 + 0.04 + 2)
    assert pricing.rates_for("gpt-4o") is None
