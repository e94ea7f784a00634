"""Configuration: a YAML file parsed once, at start-up, into frozen typed settings.

The raw file goes through three steps, each failing with a message that names the file and the
key: YAML parsing, `${ENV}` expansion of string values (`${NAME:-default}` gives a default),
then msgspec's typed decoding into the frozen structs below (every numeric bound is part of a
field's type, so msgspec names the key it refuses), followed by the cross-field checks
msgspec cannot express (a route naming an unknown upstream, two teams sharing a key...).
Handlers never read the environment or the file: they get a `Settings`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
import yaml

TokenizerName = Literal["o200k_base", "cl100k_base", "chunks", "chars"]
Balance = Literal["least_inflight", "weighted", "affinity"]

#: a duration or size that must be above zero
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
#: a duration where 0 means "not at all" (no grace, no wait, no delay)
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
#: a count or size of at least one
AtLeastOne = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
#: 0 lets the system pick a free port
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]


class ConfigError(Exception):
    """The configuration is invalid; the message names the file and the key."""


class _Struct(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class Listen(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Port = 8080


class SimulatorSettings(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The built-in simulator, started in-process on a loopback port (see gateway.sim)."""

    chunks: NonNegativeInt = 16
    delay_ms: NonNegativeFloat = 20.0
    ttft_ms: NonNegativeFloat = 50.0


class Health(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Passive health (gateway.upstream_health): this many failures within window_s cool an
    upstream down for cooldown_s, then one trial request decides. Per process."""

    max_failures: AtLeastOne = 3
    window_s: PositiveFloat = 30.0
    cooldown_s: PositiveFloat = 10.0


class Upstream(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    base_url: str | None = None
    api_key: str | None = None
    max_connections: AtLeastOne = 512
    connect_timeout_s: PositiveFloat = 5.0
    read_idle_timeout_s: PositiveFloat = 120.0
    pool_timeout_s: PositiveFloat = 5.0
    usage: Literal["passthrough", "inject"] = "passthrough"
    simulator: SimulatorSettings | None = None
    #: its share in a balanced tier
    weight: PositiveFloat = 1.0
    health: Health = Health()
    #: the provider's own quota: requests are paced with an aiolimiter.AsyncLimiter
    max_requests_per_minute: PositiveFloat | None = None


class Retry(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Retries before the first byte: `attempts` sends per request at most (at least one per
    upstream the route lists), exponential backoff with jitter between two sends to the same
    upstream, every wait within `budget_s` (default: limits.queue_timeout_s)."""

    attempts: AtLeastOne = 2
    backoff_ms: NonNegativeFloat = 200.0
    max_backoff_ms: NonNegativeFloat = 2000.0
    budget_s: NonNegativeFloat | None = None


class Route(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    models: tuple[str, ...]
    #: tiers tried in order: a name is a tier of its own, a list of names one balanced tier
    upstreams: tuple[str | tuple[str, ...], ...]
    tokenizer: TokenizerName = "o200k_base"
    #: 0 or absent: no comments
    keepalive_comment_s: NonNegativeFloat | None = None
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
    requests_per_minute: AtLeastOne | None = None
    tokens_per_minute: AtLeastOne | None = None
    concurrent_streams: AtLeastOne | None = None


class Budgets(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Spend allowed per calendar day and month (in `limits.budget_timezone`); None: no cap."""

    tokens_per_day: AtLeastOne | None = None
    tokens_per_month: AtLeastOne | None = None
    usd_per_day: PositiveFloat | None = None
    usd_per_month: PositiveFloat | None = None

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
    input: NonNegativeFloat = 0.0
    cached_input: NonNegativeFloat | None = None
    output: NonNegativeFloat = 0.0


class Limits(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    backend: Literal["local", "redis"] = "local"
    redis_url: str = "redis://127.0.0.1:6379/0"
    on_backend_error: Literal["fail_open", "fail_closed"] = "fail_open"
    max_inflight: AtLeastOne = 10000
    queue_timeout_s: NonNegativeFloat = 2.0
    write_stall_timeout_s: PositiveFloat = 60.0
    on_token_budget_exceeded: Literal["finish", "cut"] = "finish"
    default_max_tokens: AtLeastOne = 4096
    #: calendar days and months of budgets: an IANA name (zoneinfo)
    budget_timezone: str = "UTC"
    #: the local backend's spend, when a budget is configured (SQLite; relative to the cwd)
    state_file: str = "gateway-state.db"


class Settings(_Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    listen: Listen = Listen()
    max_request_bytes: AtLeastOne = 16 * 1024 * 1024
    shutdown_grace_s: NonNegativeFloat = 30.0
    #: a connection with no request in progress (idle keep-alive, or a request head that never
    #: completes: slowloris) is closed after this long
    client_idle_timeout_s: PositiveFloat = 75.0
    #: the whole request body must arrive within this long, else 408
    client_body_timeout_s: PositiveFloat = 60.0
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
        raise ConfigError(f"{source}: {_name_the_entry(str(exc), expanded)}") from exc
    _check(settings, source)
    return settings


#: the mappings whose keys are names: msgspec's error says `[...]` where the name belongs
_NAMED_ENTRIES: dict[str, type[msgspec.Struct]] = {
    "upstreams": Upstream,
    "model_limits": TeamLimits,
}
_PATH = re.compile(r"`\$((?:\.\w+|\[\d+\])*)\.(\w+)\[\.\.\.\]([^`]*)`")


def _name_the_entry(message: str, raw: Any) -> str:
    """Put the entry's name where msgspec wrote `[...]` (`$.upstreams.a.pool_timeout_s`)."""
    found = _PATH.search(message)
    if found is None or found.group(2) not in _NAMED_ENTRIES:
        return message
    head, field, rest = found.groups()
    node = raw
    for step in re.findall(r"\.(\w+)|\[(\d+)\]", head):
        node = node[step[0]] if step[0] else node[int(step[1])]
    for name, value in node[field].items():
        try:
            msgspec.convert(value, _NAMED_ENTRIES[field])
        except msgspec.ValidationError:
            return message.replace(found.group(0), f"`${head}.{field}.{name}{rest}`")
    return message


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
    if route.retry.max_backoff_ms < route.retry.backoff_ms:
        problems.append(f"{where}.retry.max_backoff_ms: must be at least backoff_ms")
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
    for i, price in enumerate(settings.pricing):
        if not price.models:
            problems.append(f"$.pricing[{i}].models: must name at least one model pattern")
    return problems


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
