#!/usr/bin/env python
"""Greedy token choice over SmolLM2's 49,152 logits: `jnp.argmax` against `decoding.greedy`
(a max, then the min index where it occurs), side by side.

Each call runs the choice 50 times in a `fori_loop` (so dispatch does not dominate);
the per-choice time is the best call ÷ 50, for b = 1 and 8 rows. Checked to agree.
A scratch A/B for the sampler, not a benchmark to quote.

    python scripts/ab_greedy.py
"""

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deltamem_jax.decoding import greedy
from deltamem_jax.forward import jit_for_backend

VOCAB, REPEATS = 49152, 50


def repeated(choose):
    def run(x):
        # c enters the logits as +0.0 · c (not folded away, as 0 · NaN is NaN), so each
        # iteration depends on the one before and none is hoisted out of the loop
        step = lambda i, c: c + choose(x + c[:, None].astype(x.dtype) * 0)  # noqa: E731
        return jax.lax.fori_loop(0, REPEATS, step, jnp.zeros(x.shape[0], jnp.int32))

    return jit_for_backend(run)


def main():
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    forms = {"argmax": repeated(lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32)), "greedy": repeated(greedy)}
    for b in (1, 8):
        x = jnp.asarray(np.random.default_rng(0).standard_normal((b, VOCAB)), jnp.float32)
        out = {n: np.asarray(f(x)) for n, f in forms.items()}
        if not (out["argmax"] == out["greedy"]).all():
            raise SystemExit(f"the two choices disagree: {out}")
        times = {n: [] for n in forms}
        for _ in range(10):
            for n, f in forms.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(x))
                times[n].append((time.perf_counter() - t0) / REPEATS)
        line = ", ".join(f"{n} {1e6 * min(ts):.0f} µs" for n, ts in times.items())
        print(f"b={b}: {line} per choice (best); argmax ÷ greedy {min(times['argmax']) / min(times['greedy']):.2f}×")


if __name__ == "__main__":
    main()
