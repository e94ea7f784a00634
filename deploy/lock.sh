#!/usr/bin/env bash
# Regenerate constraints.txt: the exact versions CI, deploy/bootstrap.sh and the image install
# (pip -c constraints.txt), resolved by pip-tools from pyproject.toml's dependencies and its
# `dev` extra. Run it after changing a dependency in pyproject.toml; existing pins are kept
# where they still fit. `deploy/lock.sh --upgrade` (or `--upgrade-package NAME`) moves pins
# to the newest releases: then run the tests, tests/core/test_private_api.py first (the
# private internals gateway/aiohttp_private.py and gateway/prometheus_private.py rely on),
# and update the versions those two modules name.
set -euo pipefail
cd "$(dirname "$0")/.."
# not bootstrap.sh: it installs from the old constraints, which may no longer fit pyproject.toml
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
[ -x .venv/bin/pip-compile ] || .venv/bin/pip install --quiet --disable-pip-version-check pip-tools
CUSTOM_COMPILE_COMMAND="deploy/lock.sh" .venv/bin/pip-compile --quiet --extra dev --strip-extras \
  --no-emit-index-url --no-emit-find-links --output-file constraints.txt "$@" pyproject.toml
{
  echo "# What was tested: CI (tests/run.sh), deploy/bootstrap.sh and deploy/Dockerfile install"
  echo "# with \`pip install -c constraints.txt\`. Do not edit by hand: run deploy/lock.sh."
  cat constraints.txt
} >constraints.txt.new
mv constraints.txt.new constraints.txt
