"""Runs the memory writers' gradient programs many times, printing progress.

    python scripts/stress_gradients.py [ROUNDS]

A regression check for an XLA CPU deadlock (see deltamem_jax/_xla_flags.py): with
`XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=true` this hangs within
seconds on jaxlib 0.10.2 (2 cores); as the package configures XLA it completes.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import deltamem_jax  # noqa: E402,F401  (applies the package's XLA flags first)
import jax  # noqa: E402
import test_delta_rule as cases  # noqa: E402  (the gradient test cases and loss)


def main(rounds: int) -> None:
    done, t0 = 0, time.time()
    for r in range(rounds):
        jax.clear_caches()
        cases._grad_fn.cache_clear()
        for scenario in ("random", "saturated", "aligned", "aligned_saturated"):
            for mode in cases.MODES:
                seed = 77 + cases.SCENARIOS.index(scenario) * 10 + cases.MODES.index(mode)
                features = cases.make_features(seed, cases.B, cases.GRAD_T, cases.GRAD_M, mode, scenario)
                args = (*features, *cases._loss_weights(seed + 1, cases.B, cases.GRAD_T, cases.GRAD_M))
                for kind, chunk in (("scan", None), ("chunked", 8), ("chunked", 64)):
                    jax.block_until_ready(cases._grad_fn(kind, chunk)(*args))
                    done += 1
        print(f"round {r}: {done} gradient programs run, {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
