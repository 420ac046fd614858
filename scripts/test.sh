#!/usr/bin/env bash
# The README's test command: installs (torch extra included, for the parity tests) and runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=torch,train bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
