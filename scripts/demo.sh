#!/usr/bin/env bash
# The README's main job: installs, then runs the δ-mem demo on SmolLM2-135M-Instruct.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=train bash scripts/setup_env.sh
exec .venv/bin/deltamem-jax demo "$@"
