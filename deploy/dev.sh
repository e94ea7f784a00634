#!/usr/bin/env bash
# Start the gateway on its built-in defaults: 127.0.0.1:8080, no auth, the simulator behind
# the `sim-*` models. Extra arguments go to `python -m gateway` (e.g. --config config/gateway.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/bootstrap.sh
exec .venv/bin/python -m gateway --log-format console "$@"
