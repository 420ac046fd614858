"""Milliseconds per layer of the multi-token memory writers, side by side.

    python scripts/bench_writers.py

Decides `DeltaMemConfig.writer="auto"`: on this project's 2-core CPUs the token scan
beats the chunked UT form at every chunk size (the r×r recurrence is microseconds per
token, the chunked form builds [c, c] matrices per state row).
"""

import functools
import time

import jax
import jax.numpy as jnp

from deltamem_jax.delta_rule import WriteInputs, write_chunked, write_scan


def features(b, t, m, r=8):
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    unit = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    q, k = unit(jax.random.normal(ks[0], (b, t, m, r))), unit(jax.random.normal(ks[1], (b, t, m, r)))
    v = jax.random.normal(ks[2], (b, t, m, r))
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, m, r)) - 1.5)
    return WriteInputs(q, k, v, beta, 1 - beta, jnp.ones_like(beta))


def ms(fn, *args, n=5):
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n * 1000


def main():
    print(f"backend {jax.default_backend()}, jax {jax.__version__}; ms per layer (best writer in bold)")
    print("| batch | tokens | sub-states | scan | chunk 8 | chunk 16 | chunk 32 | chunk 64 |")
    print("|---|---|---|---|---|---|---|---|")
    for b, t, m in [(1, 512, 1), (1, 2048, 1), (8, 512, 1), (8, 512, 4), (1, 2048, 4)]:
        x, s, valid = features(b, t, m), jnp.zeros((b, m, 8, 8)), jnp.ones((b, t), bool)
        times = [ms(jax.jit(write_scan), s, x, valid)]
        times += [ms(jax.jit(functools.partial(write_chunked, chunk_size=c)), s, x, valid) for c in (8, 16, 32, 64)]
        best = min(times)
        cells = [f"**{v:.2f}**" if v == best else f"{v:.2f}" for v in times]
        print(f"| {b} | {t} | {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
