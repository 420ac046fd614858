#!/usr/bin/env bash
# The README's test command: installs (torch extra included, for the parity tests) and runs pytest.
# Two pytest-xdist workers, a test file each at a time: most of the suite's time is XLA
# compiles, which use one core, so a 2-core machine runs two files at once. PYTEST_WORKERS=0
# runs in one process; tests/conftest.py puts the long files first. --durations lists the slowest tests (the suite should stay under 15 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=torch,train bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder --durations=15 "$@"
