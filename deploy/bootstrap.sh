#!/usr/bin/env bash
# Create .venv (once) and install the gateway into it. Idempotent; `--dev` adds test tools.
# Used by deploy/dev.sh and tests/run.sh, so a fresh clone needs nothing installed by hand.
# Installs the versions that were tested, pinned in constraints.txt (deploy/lock.sh makes it);
# a change to pyproject.toml or constraints.txt installs again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
stamp=".venv/.installed${extra:+-dev}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".${extra}"
  touch "$stamp"
fi
