"""Configuration: a YAML file parsed once, at start-up, into frozen typed settings.

The raw file goes through three steps, each failing with a message that names the file and the
key: YAML parsing, `${ENV}` expansion of string values (`${NAME:-default}` gives a default),
then msgspec's typed decoding into the frozen structs below, followed by the cross-field checks
msgspec cannot express (a route naming an unknown upstream, two teams sharing a key...).
Handlers never read the environment or the file: they get a `Settings`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

TokenizerName = Literal["o200k_base", "cl100k_base", "chunks", "chars"]
Balance = Literal["least_inflight", "weighted", "affinity"]


class ConfigError(Exception):
    """The configuration is invalid; the message names the file and the key."""


class _Struct(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class Listen(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8080


class SimulatorSettings(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The built-in simulator, started in-process on a loopback port (see gateway.sim)."""

    chunks: int = 16
    delay_ms: float = 20.0
    ttft_ms: float = 50.0


class Health(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Passive health (gateway.upstream_health): this many failures within window_s cool an
    upstream down for cooldown_s, then one trial request decides. Per process."""

    max_failures: int = 3
    window_s: float = 30.0
    cooldown_s: float = 10.0


class Upstream(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    base_url: str | None = None
    api_key: str | None = None
    max_connections: int = 512
    connect_timeout_s: float = 5.0
    read_idle_timeout_s: float = 120.0
    pool_timeout_s: float = 5.0
    usage: Literal["passthrough", "inject"] = "passthrough"
    simulator: SimulatorSettings | None = None
    #: its share in a balanced tier
    weight: float = 1.0
    health: Health = Health()
    #: the provider's own quota: requests are paced with an aiolimiter.AsyncLimiter
    max_requests_per_minute: float | None = None


class Retry(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Retries before the first byte: `attempts` sends per request at most (at least one per
    upstream the route lists), exponential backoff with jitter between two sends to the same
    upstream, every wait within `budget_s` (default: limits.queue_timeout_s)."""

    attempts: int = 2
    backoff_ms: float = 200.0
    max_backoff_ms: float = 2000.0
    budget_s: float | None = None


class Route(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    models: tuple[str, ...]
    #: tiers tried in order: a name is a tier of its own, a list of names one balanced tier
    upstreams: tuple[str | tuple[str, ...], ...]
    tokenizer: TokenizerName = "o200k_base"
    keepalive_comment_s: float | None = None
    accounting: bool = True
    balance: Balance = "least_inflight"
    affinity_header: str | None = None
    retry: Retry = Retry()

    @property
    def tiers(self) -> tuple[tuple[str, ...], ...]:
        return tuple((tier,) if isinstance(tier, str) else tier for tier in self.upstreams)

    @property
    def upstream_names(self) -> tuple[str, ...]:
        """Every upstream the route names, in the order it tries them."""
        return tuple(name for tier in self.tiers for name in tier)


class TeamLimits(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_streams: int | None = None


class Team(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    name: str
    keys: tuple[str, ...] = ()
    keys_sha256: tuple[str, ...] = ()
    limits: TeamLimits = TeamLimits()
    model_limits: dict[str, TeamLimits] = {}


class Limits(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    backend: Literal["local", "redis"] = "local"
    redis_url: str = "redis://127.0.0.1:6379/0"
    on_backend_error: Literal["fail_open", "fail_closed"] = "fail_open"
    max_inflight: int = 10000
    queue_timeout_s: float = 2.0
    write_stall_timeout_s: float = 60.0
    on_token_budget_exceeded: Literal["finish", "cut"] = "finish"
    default_max_tokens: int = 4096


class Settings(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    listen: Listen = Listen()
    max_request_bytes: int = 16 * 1024 * 1024
    shutdown_grace_s: float = 30.0
    #: a connection with no request in progress (idle keep-alive, or a request head that never
    #: completes: slowloris) is closed after this long
    client_idle_timeout_s: float = 75.0
    #: the whole request body must arrive within this long, else 408
    client_body_timeout_s: float = 60.0
    upstreams: dict[str, Upstream] = {}
    routes: tuple[Route, ...] = ()
    teams: tuple[Team, ...] = ()
    limits: Limits = Limits()

    @property
    def auth_enabled(self) -> bool:
        return bool(self.teams)


def default_settings() -> Settings:
    """What `python -m gateway` serves with no --config: the simulator behind `sim-*`, no auth."""
    return Settings(
        upstreams={"sim": Upstream(simulator=SimulatorSettings())},
        routes=(Route(models=("sim-*",), upstreams=("sim",)),),
    )


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def load_settings(path: str | Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, expand and validate a configuration file."""
    env = os.environ if environ is None else environ
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse_settings(text, env, source=str(path))


def parse_settings(text: str, environ: Mapping[str, str], source: str = "<config>") -> Settings:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    expanded = _expand(raw, environ, source, "$")
    try:
        settings = msgspec.convert(expanded, Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    _check(settings, source)
    return settings


def _expand(value: Any, environ: Mapping[str, str], source: str, where: str) -> Any:
    if isinstance(value, str):
        return _expand_string(value, environ, source, where)
    if isinstance(value, dict):
        return {k: _expand(v, environ, source, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, environ, source, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _expand_string(value: str, environ: Mapping[str, str], source: str, where: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{source}: {where}: environment variable {name} is not set")

    return _ENV_REF.sub(replace, value)


def _check(settings: Settings, source: str) -> None:
    """Cross-field rules; each error names the key."""
    problems = [*_check_upstreams(settings), *_check_routes(settings), *_check_teams(settings)]
    problems += _check_numbers(settings)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def _check_upstreams(settings: Settings) -> list[str]:
    problems = []
    for name, up in settings.upstreams.items():
        where = f"$.upstreams.{name}"
        if (up.base_url is None) == (up.simulator is None):
            problems.append(f"{where}: set exactly one of base_url or simulator")
        elif up.base_url is not None and not up.base_url.startswith(("http://", "https://")):
            problems.append(f"{where}.base_url: must start with http:// or https://")
        if up.max_connections < 1:
            problems.append(f"{where}.max_connections: must be at least 1")
        positive = {
            "weight": up.weight,
            "health.max_failures": up.health.max_failures,
            "health.window_s": up.health.window_s,
            "health.cooldown_s": up.health.cooldown_s,
            "max_requests_per_minute": up.max_requests_per_minute,
        }
        problems += [
            f"{where}.{key}: must be positive"
            for key, value in positive.items()
            if value is not None and not value > 0
        ]
    return problems


def _check_routes(settings: Settings) -> list[str]:
    problems = []
    for i, route in enumerate(settings.routes):
        where = f"$.routes[{i}]"
        if not route.models:
            problems.append(f"{where}.models: must name at least one model pattern")
        if not route.upstreams or not all(route.tiers):
            problems.append(f"{where}.upstreams: must name at least one upstream in each tier")
        names = route.upstream_names
        for up in names:
            if up not in settings.upstreams:
                problems.append(f"{where}.upstreams: unknown upstream {up!r}")
        if len(set(names)) != len(names):
            problems.append(f"{where}.upstreams: an upstream is listed twice")
        problems += _check_balance(route, where)
    return problems


def _check_balance(route: Route, where: str) -> list[str]:
    problems = []
    if route.affinity_header is not None and route.balance != "affinity":
        problems.append(f"{where}.affinity_header: only with balance: affinity")
    retry = route.retry
    if retry.attempts < 1:
        problems.append(f"{where}.retry.attempts: must be at least 1")
    if retry.backoff_ms < 0 or retry.max_backoff_ms < retry.backoff_ms:
        problems.append(f"{where}.retry.max_backoff_ms: must be at least backoff_ms (>= 0)")
    if retry.budget_s is not None and retry.budget_s < 0:
        problems.append(f"{where}.retry.budget_s: must be positive")
    return problems


def _check_teams(settings: Settings) -> list[str]:
    problems = []
    names: set[str] = set()
    digests: set[str] = set()
    for i, team in enumerate(settings.teams):
        where = f"$.teams[{i}]"
        if team.name in names or team.name == "anonymous" or not team.name:
            problems.append(f"{where}.name: {team.name!r} is empty, reserved or used twice")
        names.add(team.name)
        if not team.keys and not team.keys_sha256:
            problems.append(f"{where}: a team needs keys or keys_sha256")
        for digest in team_key_digests(team):
            if digest in digests:
                problems.append(f"{where}: a key is shared with another team")
            digests.add(digest)
        for j, hexdigest in enumerate(team.keys_sha256):
            if not re.fullmatch(r"[0-9a-fA-F]{64}", hexdigest):
                problems.append(f"{where}.keys_sha256[{j}]: not a SHA-256 hex digest")
        if any(not key for key in team.keys):
            problems.append(f"{where}.keys: a key is empty (unset environment variable?)")
    return problems


def _check_numbers(settings: Settings) -> list[str]:
    limits = settings.limits
    checks = {
        "$.max_request_bytes": settings.max_request_bytes > 0,
        "$.shutdown_grace_s": settings.shutdown_grace_s >= 0,
        "$.client_idle_timeout_s": settings.client_idle_timeout_s > 0,
        "$.client_body_timeout_s": settings.client_body_timeout_s > 0,
        "$.limits.max_inflight": limits.max_inflight > 0,
        "$.limits.queue_timeout_s": limits.queue_timeout_s >= 0,
        "$.limits.write_stall_timeout_s": limits.write_stall_timeout_s > 0,
        "$.limits.default_max_tokens": limits.default_max_tokens > 0,
    }
    return [f"{key}: must be positive" for key, ok in checks.items() if not ok]


def team_key_digests(team: Team) -> list[str]:
    """Every key of a team as a lower-case SHA-256 hex digest (plaintext keys are hashed)."""
    hashed = [hashlib.sha256(key.encode()).hexdigest() for key in team.keys if key]
    return hashed + [d.lower() for d in team.keys_sha256]
