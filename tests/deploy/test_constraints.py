"""constraints.txt pins what was tested: it fits pyproject.toml's ranges, the tests run on it,
bootstrap.sh installs from it (again when it changes), and the adapters of private internals
name the versions it pins."""

from __future__ import annotations

import os
import subprocess
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from gateway import aiohttp_private, prometheus_private
from tests.deploy import assets

CONSTRAINTS = assets.REPO / "constraints.txt"
#: the dependencies whose private internals the gateway reads, and the adapter naming them
PRIVATE_INTERNALS = {"aiohttp": aiohttp_private, "prometheus-client": prometheus_private}


def pins() -> dict[str, Requirement]:
    found: dict[str, Requirement] = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        line = line.partition("#")[0].strip()
        if line:
            requirement = Requirement(line)
            found[canonicalize_name(requirement.name)] = requirement
    return found


def pinned(name: str) -> Version:
    (spec,) = pins()[canonicalize_name(name)].specifier
    assert spec.operator == "=="
    return Version(spec.version)


def declared() -> list[Requirement]:
    project = tomllib.loads((assets.REPO / "pyproject.toml").read_text(encoding="utf-8"))
    deps = project["project"]["dependencies"] + project["project"]["optional-dependencies"]["dev"]
    return [Requirement(dep) for dep in deps]


@pytest.mark.parametrize("requirement", declared(), ids=str)
def test_every_declared_dependency_is_pinned_within_its_range(requirement: Requirement) -> None:
    assert requirement.specifier.contains(pinned(requirement.name)), requirement


def test_the_tests_run_on_the_pinned_versions() -> None:
    for name, requirement in pins().items():
        if requirement.marker is None or requirement.marker.evaluate():
            assert Version(version(name)) == pinned(name), f"{name}: run deploy/bootstrap.sh"


@pytest.mark.parametrize("name", list(PRIVATE_INTERNALS))
def test_a_dependency_read_privately_claims_no_release_older_than_the_tested_minor(
    name: str,
) -> None:
    (requirement,) = [r for r in declared() if canonicalize_name(r.name) == name]
    [floor] = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    tested = pinned(name)
    assert (floor.major, floor.minor) == (tested.major, tested.minor)


@pytest.mark.parametrize("name", list(PRIVATE_INTERNALS))
def test_the_adapter_names_the_pinned_version_it_was_tested_with(name: str) -> None:
    assert f"{name} {pinned(name)}" in (PRIVATE_INTERNALS[name].__doc__ or "")


def test_bootstrap_installs_the_pins_and_again_only_when_they_change(tmp_path: Path) -> None:
    """bootstrap.sh in a copy of the repository's layout, with a pip that records its calls."""
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "bootstrap.sh").write_bytes(
        (assets.DEPLOY / "bootstrap.sh").read_bytes()
    )
    for name in ("pyproject.toml", "constraints.txt"):
        (tmp_path / name).write_text("", encoding="utf-8")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    calls = tmp_path / "calls"
    for tool, script in (("python", "exit 0"), ("pip", f'echo "$*" >>{calls}')):
        (bin_dir / tool).write_text(f"#!/bin/sh\n{script}\n", encoding="utf-8")
        (bin_dir / tool).chmod(0o755)

    def bootstrap() -> list[str]:
        subprocess.run(["bash", "deploy/bootstrap.sh", "--dev"], cwd=tmp_path, check=True)
        return calls.read_text(encoding="utf-8").splitlines() if calls.exists() else []

    [first] = bootstrap()
    assert "-c constraints.txt -e .[dev]" in first
    assert len(bootstrap()) == 1  # nothing changed: no second install
    stamp = tmp_path / ".venv" / ".installed-dev"
    later = stamp.stat().st_mtime + 10
    os.utime(tmp_path / "constraints.txt", (later, later))
    assert len(bootstrap()) == 2  # the pins changed: installed again
