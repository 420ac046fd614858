"""Train a δ-mem adapter (same as `deltamem-jax train`); rerun the same command to resume."""

import sys

from deltamem_jax.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
