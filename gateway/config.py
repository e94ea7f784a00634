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
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
import yaml

TokenizerName = Literal["o200k_base", "cl100k_base", "chunks", "chars"]


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


class Upstream(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    base_url: str | None = None
    api_key: str | None = None
    max_connections: int = 512
    connect_timeout_s: float = 5.0
    read_idle_timeout_s: float = 120.0
    pool_timeout_s: float = 5.0
    usage: Literal["passthrough", "inject"] = "passthrough"
    simulator: SimulatorSettings | None = None


class Route(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    models: tuple[str, ...]
    upstreams: tuple[str, ...]
    tokenizer: TokenizerName = "o200k_base"
    keepalive_comment_s: float | None = None
    accounting: bool = True


class TeamLimits(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_streams: int | None = None


class Budgets(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Spend allowed per calendar day and month (in `limits.budget_timezone`); None: no cap."""

    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    usd_per_day: float | None = None
    usd_per_month: float | None = None

    def caps(self) -> dict[str, float]:
        """The configured budgets by name (`tokens_per_day`...), unset ones left out."""
        return {name: value for name in BUDGET_NAMES if (value := getattr(self, name)) is not None}


#: the budget names, in the order they are checked and reported
BUDGET_NAMES = ("tokens_per_day", "tokens_per_month", "usd_per_day", "usd_per_month")


class TeamKey(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A key with its own name (a bounded label), and limits and budgets on top of its team's."""

    name: str
    key: str | None = None
    key_sha256: str | None = None
    limits: TeamLimits = TeamLimits()
    budgets: Budgets = Budgets()


class Team(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    name: str
    keys: tuple[str | TeamKey, ...] = ()
    keys_sha256: tuple[str, ...] = ()
    limits: TeamLimits = TeamLimits()
    model_limits: dict[str, TeamLimits] = {}
    budgets: Budgets = Budgets()


class Price(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """USD per million tokens for the models it names (names or fnmatch patterns).

    Reasoning tokens are output tokens; cached prompt tokens cost `cached_input` (by default
    the `input` price)."""

    models: tuple[str, ...]
    input: float = 0.0
    cached_input: float | None = None
    output: float = 0.0


class Limits(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    backend: Literal["local", "redis"] = "local"
    redis_url: str = "redis://127.0.0.1:6379/0"
    on_backend_error: Literal["fail_open", "fail_closed"] = "fail_open"
    max_inflight: int = 10000
    queue_timeout_s: float = 2.0
    write_stall_timeout_s: float = 60.0
    on_token_budget_exceeded: Literal["finish", "cut"] = "finish"
    default_max_tokens: int = 4096
    #: calendar days and months of budgets: an IANA name (zoneinfo)
    budget_timezone: str = "UTC"
    #: the local backend's spend, when a budget is configured (SQLite; relative to the cwd)
    state_file: str = "gateway-state.db"


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
    pricing: tuple[Price, ...] = ()

    @property
    def auth_enabled(self) -> bool:
        return bool(self.teams)

    @property
    def budgets_enabled(self) -> bool:
        """Whether any team or key has a budget: only then is spend kept (and stored)."""
        return any(
            team.budgets.caps() or any(key.budgets.caps() for key in named_keys(team))
            for team in self.teams
        )


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
    problems += _check_budgets(settings)
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
    return problems


def _check_routes(settings: Settings) -> list[str]:
    problems = []
    for i, route in enumerate(settings.routes):
        where = f"$.routes[{i}]"
        if not route.models:
            problems.append(f"{where}.models: must name at least one model pattern")
        if not route.upstreams:
            problems.append(f"{where}.upstreams: must name at least one upstream")
        for up in route.upstreams:
            if up not in settings.upstreams:
                problems.append(f"{where}.upstreams: unknown upstream {up!r}")
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
        problems += _check_named_keys(team, where)
    return problems


def _check_named_keys(team: Team, where: str) -> list[str]:
    problems = []
    names: set[str] = set()
    for j, entry in enumerate(team.keys):
        if not isinstance(entry, TeamKey):
            continue
        at = f"{where}.keys[{j}]"
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", entry.name) or entry.name in names:
            problems.append(
                f"{at}.name: {entry.name!r} is not a short [A-Za-z0-9._-] name, or twice"
            )
        names.add(entry.name)
        if (entry.key is None) == (entry.key_sha256 is None):
            problems.append(f"{at}: set exactly one of key or key_sha256")
        elif entry.key == "":
            problems.append(f"{at}.key: empty (unset environment variable?)")
        elif entry.key_sha256 is not None and not re.fullmatch(
            r"[0-9a-fA-F]{64}", entry.key_sha256
        ):
            problems.append(f"{at}.key_sha256: not a SHA-256 hex digest")
    return problems


def _check_budgets(settings: Settings) -> list[str]:
    problems = []
    try:
        ZoneInfo(settings.limits.budget_timezone)
    except (ZoneInfoNotFoundError, ValueError):
        problems.append("$.limits.budget_timezone: not an IANA time zone name")
    for i, team in enumerate(settings.teams):
        budgets = [(f"$.teams[{i}].budgets", team.budgets)]
        budgets += [(f"$.teams[{i}].keys.{k.name}.budgets", k.budgets) for k in named_keys(team)]
        for where, entry in budgets:
            problems += [
                f"{where}.{n}: must be positive" for n, v in entry.caps().items() if v <= 0
            ]
    for i, price in enumerate(settings.pricing):
        rates = (price.input, price.output, price.cached_input or 0.0)
        if not price.models or any(rate < 0 for rate in rates):
            problems.append(f"$.pricing[{i}]: needs models and prices of at least 0")
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
    return [digest for digest, _ in team_key_entries(team)]


def team_key_entries(team: Team) -> list[tuple[str, TeamKey | None]]:
    """Every key of a team as (lower-case SHA-256 hex digest, its named entry or None)."""
    entries: list[tuple[str, TeamKey | None]] = []
    for entry in team.keys:
        if isinstance(entry, str):
            if entry:
                entries.append((hashlib.sha256(entry.encode()).hexdigest(), None))
        elif entry.key:
            entries.append((hashlib.sha256(entry.key.encode()).hexdigest(), entry))
        elif entry.key_sha256:
            entries.append((entry.key_sha256.lower(), entry))
    return entries + [(d.lower(), None) for d in team.keys_sha256]


def named_keys(team: Team) -> list[TeamKey]:
    """A team's keys that have a name (and maybe limits and budgets of their own)."""
    return [entry for entry in team.keys if isinstance(entry, TeamKey)]


def named_key(team: Team, name: str | None) -> TeamKey | None:
    """A team's key by its name (None for None: a plain string key)."""
    if name is None:
        return None
    return next((key for key in named_keys(team) if key.name == name), None)
