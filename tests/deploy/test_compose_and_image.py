"""compose.yaml and the Dockerfile, read and cross-checked (Docker cannot run where this is
developed): every name, path, address and port one file gives another must agree."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from gateway.config import Settings, parse_settings
from tests.deploy import assets

#: compose's `${NAME:-default}` / `${NAME-default}` / `${NAME}`
COMPOSE_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """What compose makes of a value when the shell sets none of the variables."""
    if isinstance(value, str):
        return COMPOSE_VARIABLE.sub(lambda m: m[2] or "", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = interpolate(assets.load_yaml(assets.COMPOSE))
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path (resolved from deploy/) of each bind mount."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        assert source.startswith("."), f"{volume}: only bind mounts of repo files are expected"
        mounts[target] = (assets.DEPLOY / source).resolve()
    return mounts


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Both forms of depends_on (a list of names, or a map name -> condition) as a map."""
    depends = service.get("depends_on", {})
    if isinstance(depends, list):
        return {name: {"condition": "service_started"} for name in depends}
    found: dict[str, dict[str, str]] = depends
    return found


def flag(args: list[str], name: str) -> str:
    """The value of `--name value` or `--name=value` in an argument list."""
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


def flags(args: list[str], name: str) -> list[str]:
    return [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]


@pytest.fixture(scope="module")
def gateway_settings(services: dict[str, dict[str, Any]]) -> Settings:
    """The compose gateway config, loaded by the gateway with the service's environment."""
    environment = services["gateway"]["environment"]
    text = assets.COMPOSE_GATEWAY_CONFIG.read_text(encoding="utf-8")
    return parse_settings(text, environment, str(assets.COMPOSE_GATEWAY_CONFIG))


# --- compose.yaml -------------------------------------------------------------------------


def test_every_service_referenced_exists(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert set(depends_on(service)) <= set(services), name


def test_services_waited_on_as_healthy_have_a_health_check(
    services: dict[str, dict[str, Any]],
) -> None:
    image_has_check = any(i.name == "HEALTHCHECK" for i in dockerfile().final.instructions)
    for service in services.values():
        for name, condition in depends_on(service).items():
            if condition.get("condition") != "service_healthy":
                continue
            check = services[name].get("healthcheck", {})
            assert not check.get("disable"), name
            assert "test" in check or ("build" in services[name] and image_has_check), name


def test_every_mounted_file_exists_in_the_repo(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"


def test_images_build_from_the_repo_root_with_the_shipped_dockerfile(
    services: dict[str, dict[str, Any]],
) -> None:
    builds = [s["build"] for s in services.values() if "build" in s]
    assert builds
    for build in builds:
        context = (assets.DEPLOY / build["context"]).resolve()
        assert context == assets.REPO
        assert (context / build["dockerfile"]).resolve() == assets.DOCKERFILE


def test_prometheus_runs_the_shipped_config_and_rules(
    services: dict[str, dict[str, Any]],
) -> None:
    prometheus = services["prometheus"]
    mounts = bind_mounts(prometheus)
    assert mounts[flag(prometheus["command"], "--config.file")] == assets.PROMETHEUS_CONFIG
    (pattern,) = assets.load_yaml(assets.PROMETHEUS_CONFIG)["rule_files"]
    rules_dir = mounts[str(Path(pattern).parent)]
    assert sorted(rules_dir.glob(Path(pattern).name)) == sorted(assets.RULE_FILES)


def test_prometheus_scrapes_the_gateway_service_on_its_listen_port(
    services: dict[str, dict[str, Any]], gateway_settings: Settings
) -> None:
    jobs = {j["job_name"]: j for j in assets.load_yaml(assets.PROMETHEUS_CONFIG)["scrape_configs"]}
    (target,) = jobs["gateway"]["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in services
    assert int(port) == gateway_settings.listen.port
    assert jobs["gateway"].get("metrics_path", "/metrics") == "/metrics"


def test_gateway_reads_the_mounted_config_and_publishes_its_listen_port(
    services: dict[str, dict[str, Any]], gateway_settings: Settings
) -> None:
    gateway = services["gateway"]
    config_path = flag(gateway["command"], "--config")
    assert bind_mounts(gateway)[config_path] == assets.COMPOSE_GATEWAY_CONFIG
    assert gateway_settings.listen.host == "0.0.0.0"
    published = [int(p.split(":")[-1]) for p in gateway["ports"]]
    assert published == [gateway_settings.listen.port]


def test_gateway_config_routes_sim_models_to_the_sim_service_and_limits_to_redis(
    services: dict[str, dict[str, Any]], gateway_settings: Settings
) -> None:
    sim_url = urlsplit(gateway_settings.upstreams["sim"].base_url or "")
    assert sim_url.hostname in services
    sim = services[sim_url.hostname]
    assert sim["entrypoint"] == ["python", "-m", "gateway.sim"]
    assert int(flag(sim["command"], "--port")) == sim_url.port
    assert any(
        "sim-*" in route.models and "sim" in route.upstreams for route in gateway_settings.routes
    )
    assert gateway_settings.limits.backend == "redis"
    assert urlsplit(gateway_settings.limits.redis_url).hostname in services


def test_gateway_stops_later_than_its_drain(
    services: dict[str, dict[str, Any]], gateway_settings: Settings
) -> None:
    grace = services["gateway"]["stop_grace_period"]
    assert grace.endswith("s")
    assert float(grace[:-1]) > gateway_settings.shutdown_grace_s


def test_loadgen_runs_the_mounted_script_against_the_gateway_with_team_keys(
    services: dict[str, dict[str, Any]], gateway_settings: Settings
) -> None:
    loadgen = services["loadgen"]
    script = loadgen["entrypoint"][-1]
    assert bind_mounts(loadgen)[script] == assets.LOADGEN
    base_url = urlsplit(flag(loadgen["command"], "--base-url"))
    assert base_url.hostname in services
    assert base_url.port == gateway_settings.listen.port
    keys = {key for team in gateway_settings.teams for key in team.keys}
    assert set(flags(loadgen["command"], "--key")) == keys
    for model in flags(loadgen["command"], "--model"):
        assert any(fnmatch.fnmatchcase(model, p) for r in gateway_settings.routes for p in r.models)


def test_grafana_is_provisioned_with_the_shipped_datasource_and_dashboards(
    services: dict[str, dict[str, Any]],
) -> None:
    grafana = services["grafana"]
    mounts = bind_mounts(grafana)
    provisioning = Path("/etc/grafana/provisioning")
    assert mounts[str(provisioning / "datasources")] == assets.DATASOURCES.parent
    assert mounts[str(provisioning / "dashboards")] == assets.DASHBOARD_PROVIDERS.parent
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert mounts[str(home.parent)] / home.name == assets.DASHBOARD


# --- Dockerfile ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instruction:
    name: str
    args: str


@dataclass(slots=True)
class Stage:
    base: str
    alias: str | None
    instructions: list[Instruction] = field(default_factory=list)


@dataclass(slots=True)
class Dockerfile:
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def dockerfile() -> Dockerfile:
    """The Dockerfile's stages and instructions (continuations joined, comments dropped)."""
    text = assets.DOCKERFILE.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    stages: list[Stage] = []
    for line in filter(str.strip, joined.splitlines()):
        name, _, args = line.strip().partition(" ")
        if name.upper() == "FROM":
            parts = args.split()
            stages.append(Stage(parts[0], parts[2] if len(parts) > 2 else None))
        elif stages:
            stages[-1].instructions.append(Instruction(name.upper(), args.strip()))
    return Dockerfile(stages)


def instruction(stage: Stage, name: str) -> str:
    (found,) = [i.args for i in stage.instructions if i.name == name]
    return found


def copied_from_context(stages: list[Stage]) -> list[str]:
    """The build context's paths the stages COPY (not those from another stage)."""
    return [
        source
        for stage in stages
        for i in stage.instructions
        if i.name == "COPY" and not i.args.startswith("--from=")
        for source in shlex.split(i.args)[:-1]
    ]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not exec form: {args}"
    return [str(v) for v in value]


def test_image_is_multi_stage_and_ships_only_the_built_virtualenv() -> None:
    image = dockerfile()
    assert len(image.stages) >= 2
    copies = [i.args for i in image.final.instructions if i.name == "COPY"]
    assert copies
    assert all(c.startswith("--from=") for c in copies)


def test_image_runs_as_the_non_root_user_kubernetes_expects() -> None:
    user = instruction(dockerfile().final, "USER").split(":")[0]
    assert user.isdigit()
    assert int(user) != 0
    deployment = assets.load_yaml(assets.K8S_BASE / "deployment.yaml")
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(user)


def test_image_entry_point_is_the_gateway_reading_the_mounted_config() -> None:
    final = dockerfile().final
    assert exec_form(instruction(final, "ENTRYPOINT")) == ["python", "-m", "gateway"]
    assert flag(exec_form(instruction(final, "CMD")), "--config") == "/etc/gateway/gateway.yaml"


def test_image_health_check_probes_healthz_with_python_on_the_exposed_port(
    gateway_settings: Settings,
) -> None:
    final = dockerfile().final
    check = instruction(final, "HEALTHCHECK")
    command = exec_form(check[check.index("CMD") + 3 :].strip())
    assert command[:2] == ["python", "-c"]
    assert "urllib.request" in command[2]
    assert "GATEWAY_HEALTH_URL" in command[2]
    env = dict(
        re.findall(r"(\w+)=(\S+)", " ".join(i.args for i in final.instructions if i.name == "ENV"))
    )
    url = urlsplit(env["GATEWAY_HEALTH_URL"])
    assert url.path == "/healthz"
    assert url.port == int(instruction(final, "EXPOSE")) == gateway_settings.listen.port


def test_image_installs_the_tested_versions_from_the_constraints_file() -> None:
    build = dockerfile().stages[0]
    assert "constraints.txt" in copied_from_context([build])
    installs = [
        shlex.split(command)
        for i in build.instructions
        if i.name == "RUN"
        for command in i.args.split("&&")
        if " install " in command
    ]
    assert installs
    for words in installs:
        assert words[words.index("-c") + 1] == "constraints.txt", words


def _ignored(path: str, patterns: list[str]) -> bool:
    """BuildKit's rule, simplified: the last pattern matching the path decides."""
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        if fnmatch.fnmatchcase(path, pattern) or path.startswith(pattern + "/"):
            ignored = not negated
    return ignored


def test_build_context_keeps_what_the_image_copies_and_drops_the_rest() -> None:
    ignore_file = assets.DOCKERFILE.with_name("Dockerfile.dockerignore")
    patterns = [
        line.strip()
        for line in ignore_file.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = copied_from_context(dockerfile().stages)
    assert sources
    for source in sources:
        assert (assets.REPO / source).exists(), f"COPY {source}: not in the repository"
        assert not _ignored(source.rstrip("/"), patterns), f"COPY {source}: excluded from context"
    for heavy in (".venv", ".git", "tests", "deploy/compose.yaml"):
        assert _ignored(heavy, patterns), heavy


# --- command lines ------------------------------------------------------------------------


def test_command_lines_parse_with_the_programs_own_argument_parsers(
    services: dict[str, dict[str, Any]],
) -> None:
    """A flag the program does not know stops the container at start: parse each one here."""
    from gateway.__main__ import parse_args as gateway_args
    from gateway.sim.__main__ import parse_args as sim_args

    deployment = assets.load_yaml(assets.K8S_BASE / "deployment.yaml")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    for args in (
        services["gateway"]["command"],
        exec_form(instruction(dockerfile().final, "CMD")),
        container["args"],
    ):
        assert gateway_args(args).config == "/etc/gateway/gateway.yaml"
    sim = sim_args(services["sim"]["command"])
    assert sim.host == "0.0.0.0"  # reachable from the gateway container
    plan = loadgen_args(services["loadgen"]["command"])
    assert plan.requests is None  # the demo runs until the stack stops


def loadgen_args(argv: list[str]) -> Any:
    """The demo load generator's parser (a script, not a package: loaded from its path)."""
    spec = importlib.util.spec_from_file_location("demo_load", assets.LOADGEN)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(module)
        return module.parse_args(argv)
    finally:
        del sys.modules[spec.name]
