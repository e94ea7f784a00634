"""The balancer on its own: policies, passive health, tiers, configuration, invariants.

A fake clock drives time; a seeded `random.Random` makes each distribution reproducible.
The end-to-end behaviour (simulators, the SDK, the log line) is in test_balancing_e2e.py.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from gateway.balancer import Balancer, RoutePlan, UpstreamState
from gateway.config import ConfigError, Health, Route, Settings, Upstream, parse_settings
from gateway.metrics import GatewayMetrics


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def balancer_for(
    weights: dict[str, float],
    *,
    balance: str = "least_inflight",
    tiers: tuple[str | tuple[str, ...], ...] | None = None,
    health: Health | None = None,
    seed: int = 7,
) -> tuple[Balancer, RoutePlan, Clock, GatewayMetrics]:
    upstreams = {
        name: Upstream(base_url=f"http://127.0.0.1:1/{name}", weight=w, health=health or Health())
        for name, w in weights.items()
    }
    route = Route(
        models=("m",),
        upstreams=tiers if tiers is not None else (tuple(weights),),
        balance=balance,  # type: ignore[arg-type]
    )
    settings_ = Settings(upstreams=upstreams, routes=(route,))
    clock = Clock()
    metrics = GatewayMetrics(CollectorRegistry())
    balancer = Balancer(settings_, metrics, clock=clock, rng=random.Random(seed))
    return balancer, balancer.plan(route), clock, metrics


def first_choice(balancer: Balancer, plan: RoutePlan, key: bytes | None = None) -> UpstreamState:
    found = balancer.choose(plan, None, key)
    assert found is not None
    return found


def fail(balancer: Balancer, plan: RoutePlan, state: UpstreamState, times: int) -> None:
    for _ in range(times):
        balancer.claim(state)
        balancer.failed(plan, state, "connect")
        state.end()


# -- configuration ------------------------------------------------------------------------------

CONFIG = """
upstreams:
  a: {base_url: "http://a/v1", weight: 2}
  b: {base_url: "http://b/v1", health: {max_failures: 5, window_s: 10, cooldown_s: 3}}
  c: {base_url: "http://c/v1", max_requests_per_minute: 60}
routes:
  - models: ["llama-*"]
    upstreams: [[a, b], c]
    balance: affinity
    affinity_header: x-session-id
    retry: {attempts: 3, backoff_ms: 50, max_backoff_ms: 400, budget_s: 1.5}
  - {models: ["old-*"], upstreams: [a, b]}
"""


def test_a_list_in_upstreams_is_one_balanced_tier_and_names_keep_their_failover_meaning() -> None:
    parsed = parse_settings(CONFIG, {})
    balanced, old = parsed.routes
    assert balanced.tiers == (("a", "b"), ("c",))
    assert old.tiers == (("a",), ("b",))  # a plain list: each name its own tier, in order
    assert (balanced.balance, balanced.affinity_header) == ("affinity", "x-session-id")
    assert (balanced.retry.attempts, balanced.retry.budget_s) == (3, 1.5)
    assert old.balance == "least_inflight" and old.retry.attempts == 2
    assert (old.retry.backoff_ms, old.retry.max_backoff_ms) == (200, 2000)
    assert parsed.upstreams["a"].weight == 2 and parsed.upstreams["c"].weight == 1
    assert parsed.upstreams["a"].health == Health(max_failures=3, window_s=30, cooldown_s=10)
    assert parsed.upstreams["b"].health.max_failures == 5
    assert parsed.upstreams["c"].max_requests_per_minute == 60


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (("weight: 2", "weight: 0"), "$.upstreams.a.weight"),
        (("max_failures: 5", "max_failures: 0"), "$.upstreams.b.health.max_failures"),
        (("cooldown_s: 3", "cooldown_s: -1"), "$.upstreams.b.health.cooldown_s"),
        (("max_requests_per_minute: 60", "max_requests_per_minute: 0"), "max_requests_per_minute"),
        (("attempts: 3", "attempts: 0"), "$.routes[0].retry.attempts"),
        (("max_backoff_ms: 400", "max_backoff_ms: 10"), "$.routes[0].retry.max_backoff_ms"),
        (("budget_s: 1.5", "budget_s: -1"), "$.routes[0].retry.budget_s"),
        (("balance: affinity", "balance: random"), "$.routes[0].balance"),
        (("balance: affinity", "balance: weighted"), "$.routes[0].affinity_header"),
        (("[[a, b], c]", "[[a, b], a]"), "$.routes[0].upstreams: an upstream is listed twice"),
        (("[[a, b], c]", "[[], c]"), "$.routes[0].upstreams"),
        (("[[a, b], c]", "[[a, zz], c]"), "unknown upstream 'zz'"),
        (("weight: 2", "weight: heavy"), "$.upstreams.a.weight"),
    ],
)
def test_invalid_balancing_settings_name_the_key(change: tuple[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("$", r"\$")):
        parse_settings(CONFIG.replace(*change), {})


# -- policies -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_weighted_follows_the_weights_within_5_percent_over_3000_requests(seed: int) -> None:
    balancer, plan, _, _ = balancer_for({"a": 1, "b": 1, "c": 2}, balance="weighted", seed=seed)
    picks = Counter(first_choice(balancer, plan).name for _ in range(3000))
    shares = {name: picks[name] / 3000 for name in "abc"}
    # within 5 points of each share (uniform choice would be 8 points off)
    assert shares == pytest.approx({"a": 0.25, "b": 0.25, "c": 0.5}, abs=0.05)


def test_least_inflight_prefers_the_member_with_the_lowest_in_flight_per_weight() -> None:
    balancer, plan, _, _ = balancer_for({"a": 1, "b": 1, "c": 2})
    open_: list[UpstreamState] = []
    for _ in range(400):  # streams that never end: the counts settle at the weights' ratio
        state = first_choice(balancer, plan)
        balancer.claim(state)
        open_.append(state)
    counts = Counter(state.name for state in open_)
    assert counts == {"a": 100, "b": 100, "c": 200} or all(
        abs(counts[name] - want) <= 2 for name, want in (("a", 100), ("b", 100), ("c", 200))
    )


def test_affinity_keeps_a_key_on_one_member_and_moves_only_the_cooled_members_keys() -> None:
    balancer, plan, _, _ = balancer_for({"a": 1, "b": 1, "c": 1}, balance="affinity")
    keys = [f"session-{i}".encode() for i in range(300)]
    before = {key: first_choice(balancer, plan, key).name for key in keys}
    again = {key: first_choice(balancer, plan, key).name for key in keys}
    assert again == before  # every session, every time, on its member
    assert set(Counter(before.values())) == {"a", "b", "c"}
    fail(balancer, plan, balancer.upstreams["b"], 3)  # b is cooled down
    after = {key: first_choice(balancer, plan, key).name for key in keys}
    moved = {key for key in keys if after[key] != before[key]}
    assert moved == {key for key in keys if before[key] == "b"}
    assert "b" not in after.values()


def test_affinity_passes_a_key_on_when_its_member_is_overloaded() -> None:
    balancer, plan, _, _ = balancer_for({"a": 1, "b": 1, "c": 1}, balance="affinity")
    key = b"hot-session"
    home = first_choice(balancer, plan, key)
    served: Counter[str] = Counter()
    for _ in range(30):  # one session opening many streams at once
        state = first_choice(balancer, plan, key)
        balancer.claim(state)
        served[state.name] += 1
    assert served[home.name] < 30 and len(served) > 1
    loads = [state.inflight for state in plan.members]
    assert max(loads) <= 1.25 * sum(loads) / 3 + 2


def test_affinity_without_a_key_balances_on_in_flight() -> None:
    balancer, plan, _, _ = balancer_for({"a": 1, "b": 1}, balance="affinity")
    for _ in range(10):
        balancer.claim(first_choice(balancer, plan, None))
    assert [state.inflight for state in plan.members] == [5, 5]


# -- passive health -------------------------------------------------------------------------------


def test_failures_cool_down_then_one_trial_request_restores() -> None:
    health = Health(max_failures=3, window_s=30, cooldown_s=10)
    balancer, plan, clock, metrics = balancer_for({"a": 1, "b": 1}, health=health)
    a = balancer.upstreams["a"]
    fail(balancer, plan, a, 2)
    assert a.health.usable(clock.now)  # two failures: not yet
    fail(balancer, plan, a, 1)
    assert not a.health.usable(clock.now)
    assert {first_choice(balancer, plan).name for _ in range(20)} == {"b"}
    assert metrics.upstream_healthy.labels("a")._value.get() == 0
    clock.now += 10
    assert balancer.claim(a)  # the one trial request
    assert not a.health.usable(clock.now)  # no second one while it is in flight
    balancer.succeeded(a)
    a.end()
    assert a.health.trusted(clock.now)
    assert metrics.upstream_healthy.labels("a")._value.get() == 1
    assert (
        metrics.registry.get_sample_value(
            "gateway_upstream_cooldowns_total", {"upstream": "a", "reason": "failures"}
        )
        == 1
    )


def test_a_failed_trial_cools_down_again() -> None:
    health = Health(max_failures=1, window_s=30, cooldown_s=5)
    balancer, plan, clock, metrics = balancer_for({"a": 1, "b": 1}, health=health)
    a = balancer.upstreams["a"]
    fail(balancer, plan, a, 1)
    clock.now += 5
    fail(balancer, plan, a, 1)  # the trial fails
    assert not a.health.usable(clock.now) and a.health.cooled_until == clock.now + 5
    assert (
        metrics.registry.get_sample_value(
            "gateway_upstream_cooldowns_total", {"upstream": "a", "reason": "probe_failed"}
        )
        == 1
    )


def test_an_abandoned_trial_lets_the_next_request_try() -> None:
    balancer, plan, clock, _ = balancer_for({"a": 1, "b": 1}, health=Health(max_failures=1))
    a = balancer.upstreams["a"]
    fail(balancer, plan, a, 1)
    clock.now += 10
    assert balancer.claim(a)
    balancer.abandoned(a, probe=True)
    a.end()
    assert a.health.usable(clock.now)


def test_a_trial_answered_with_retry_after_on_the_last_healthy_member_frees_the_trial() -> None:
    balancer, plan, clock, _ = balancer_for({"a": 1, "b": 1}, health=Health(max_failures=1))
    a, b = balancer.upstreams["a"], balancer.upstreams["b"]
    fail(balancer, plan, a, 1)
    b.health.cool(clock.now, 5, trial=True)  # (as another route would have)
    clock.now += 10
    assert balancer.claim(a)
    balancer.asked_to_wait(plan, a, 1)  # not cooled: nothing else of the route is trusted
    a.end()
    assert a.health.usable(clock.now) and not a.health.probing


def test_failures_outside_the_window_do_not_add_up() -> None:
    balancer, plan, clock, _ = balancer_for({"a": 1, "b": 1}, health=Health(window_s=30))
    a = balancer.upstreams["a"]
    for _ in range(6):
        fail(balancer, plan, a, 1)
        clock.now += 20
    assert a.health.trusted(clock.now)


def test_the_last_healthy_member_of_a_route_is_never_cooled_down() -> None:
    balancer, plan, clock, _ = balancer_for({"a": 1, "b": 1}, health=Health(max_failures=1))
    a, b = balancer.upstreams["a"], balancer.upstreams["b"]
    fail(balancer, plan, a, 1)
    fail(balancer, plan, b, 5)
    assert not a.health.usable(clock.now) and b.health.trusted(clock.now)
    balancer.asked_to_wait(plan, b, 30)
    assert b.health.trusted(clock.now)


def test_a_route_with_nothing_usable_tries_its_least_recently_failed_upstream() -> None:
    balancer, plan, clock, _ = balancer_for(
        {"a": 1, "b": 1}, tiers=("a", "b"), health=Health(max_failures=1)
    )
    a, b = balancer.upstreams["a"], balancer.upstreams["b"]
    fail(balancer, plan, b, 1)  # b cooled down (a still healthy)
    clock.now += 1
    balancer.asked_to_wait(plan, a, 60)  # not cooled: a is the last healthy one
    clock.now += 1
    b.health.cool(clock.now, 60, trial=True)  # say another route cooled both
    a.health.cool(clock.now, 60, trial=True)
    a.health.last_failure = clock.now
    assert first_choice(balancer, plan) is b  # its failure is the older one
    assert balancer.choose(plan, {"b": 1}, None, 1) is None


def test_retry_after_pauses_an_upstream_without_counting_a_failure() -> None:
    balancer, plan, clock, metrics = balancer_for({"a": 1, "b": 1, "c": 1})
    a = balancer.upstreams["a"]
    balancer.asked_to_wait(plan, a, 2)
    assert not a.health.usable(clock.now) and len(a.health.failures) == 0
    assert {first_choice(balancer, plan).name for _ in range(30)} == {"b", "c"}
    clock.now += 2
    assert a.health.trusted(clock.now)  # trusted again at once: no trial request needed
    balancer.asked_to_wait(plan, a, 10_000)
    assert a.health.cooled_until == clock.now + 300  # capped
    assert (
        metrics.registry.get_sample_value(
            "gateway_upstream_cooldowns_total", {"upstream": "a", "reason": "retry_after"}
        )
        == 2
    )


def test_tiers_are_tried_in_order_and_each_upstream_once_before_any_retry() -> None:
    balancer, plan, _, _ = balancer_for({"a": 1, "b": 1, "c": 1}, tiers=(("a", "b"), "c"))
    tried: dict[str, int] = {}
    order = []
    for sent in range(1, 4):
        state = balancer.choose(plan, tried or None, None, sent - 1)
        assert state is not None
        order.append(state.name)
        tried[state.name] = 1
    assert set(order[:2]) == {"a", "b"} and order[2] == "c"
    assert balancer.choose(plan, tried, None, 3) is None  # attempts: max(2, 3 upstreams)


def test_a_single_upstream_is_retried_while_attempts_allow() -> None:
    balancer, plan, _, _ = balancer_for({"a": 1})
    assert balancer.choose(plan, {"a": 1}, None, 1) is balancer.upstreams["a"]
    assert balancer.choose(plan, {"a": 2}, None, 2) is None


def test_reload_keeps_in_flight_counts_and_cooldowns_of_kept_upstreams() -> None:
    balancer, plan, clock, _ = balancer_for({"a": 1, "b": 1}, health=Health(max_failures=1))
    a, b = balancer.upstreams["a"], balancer.upstreams["b"]
    balancer.claim(b)
    fail(balancer, plan, a, 1)
    route = Route(models=("m",), upstreams=(("a", "b", "c"),), balance="weighted")
    upstreams = {
        "a": Upstream(base_url="http://127.0.0.1:1/a", health=Health(cooldown_s=99)),
        "b": Upstream(base_url="http://127.0.0.1:1/b", weight=5),
        "c": Upstream(base_url="http://127.0.0.1:1/c"),
    }
    balancer.configure(Settings(upstreams=upstreams, routes=(route,)))
    assert balancer.upstreams["a"] is a and balancer.upstreams["b"] is b
    assert b.inflight == 1 and b.weight == 5
    assert not a.health.usable(clock.now) and a.health.settings.cooldown_s == 99
    new_plan = balancer.plan(route)
    assert [s.name for s in new_plan.members] == ["a", "b", "c"]
    assert new_plan.balance == "weighted"


# -- invariants -----------------------------------------------------------------------------------

Op = tuple[str, int]
OPS = st.lists(
    st.tuples(
        st.sampled_from(["start", "end", "fail", "succeed", "wait", "tick", "abandon"]),
        st.integers(min_value=0, max_value=50),
    ),
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_in_flight_counts_stay_equal_to_the_streams_really_open(ops: list[Op]) -> None:
    health = Health(max_failures=2, window_s=5, cooldown_s=3)
    balancer, plan, clock, metrics = balancer_for({"a": 1, "b": 2, "c": 1}, health=health)
    open_: list[tuple[UpstreamState, bool]] = []
    for op, n in ops:
        if op == "start":
            state = balancer.choose(plan, None, str(n).encode())
            assert state is not None  # a route always has an upstream to try
            open_.append((state, balancer.claim(state)))
        elif op == "tick":
            clock.now += n / 10
        elif open_:
            state, probe = open_.pop(n % len(open_))
            if op == "fail":
                balancer.failed(plan, state, "connect")
            elif op == "succeed":
                balancer.succeeded(state)
            elif op == "wait":
                balancer.asked_to_wait(plan, state, n)
            elif op == "abandon":
                balancer.abandoned(state, probe)
            state.end()
        for state in plan.members:
            really = sum(1 for s, _ in open_ if s is state)
            assert state.inflight == really >= 0
            gauge = metrics.registry.get_sample_value(
                "gateway_upstream_inflight", {"upstream": state.name}
            )
            assert gauge == really
        # nothing cools the last trusted member of the route down
        assert any(state.health.trusted(clock.now) for state in plan.members)
