#!/usr/bin/env bash
# The test command: installs what the tests need (the virtual environment, and Debian's
# redis-server and prometheus when missing and apt is available), then lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v prometheus >/dev/null || need+=(prometheus)
command -v nginx >/dev/null || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# the Debian packages start their own services; the tests start private instances instead
for svc in redis-server prometheus nginx; do
  (command -v systemctl >/dev/null && systemctl stop "$svc" 2>/dev/null) || true
  (command -v service >/dev/null && service "$svc" stop >/dev/null 2>&1) || true
done
bash deploy/bootstrap.sh --dev
echo "== ruff"; .venv/bin/ruff check gateway tests bench deploy/loadgen
echo "== ruff format"; .venv/bin/ruff format --check gateway tests bench deploy/loadgen
echo "== mypy --strict"; .venv/bin/mypy
echo "== pytest"; exec .venv/bin/pytest "$@"
