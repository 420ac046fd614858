"""Do two independent matvecs over pre-split weight halves run concurrently on XLA CPU?"""
import time, sys
import jax, jax.numpy as jnp, numpy as np

L, d, f = 30, 576, 1536
rng = np.random.default_rng(0)
W = [rng.standard_normal((d, f), np.float32) for _ in range(L)]
nbytes = sum(w.nbytes for w in W)

def run(name, parts, b, reps=15):
    ws = [[jnp.asarray(np.ascontiguousarray(p)) for p in np.split(w, parts, axis=1)] for w in W]
    def f_(x, ws):
        acc = x
        for halves in ws:
            y = jnp.concatenate([acc @ h for h in halves], axis=-1)
            acc = acc + jnp.tanh(y[:, :d]) * 1e-3
        return acc
    fn = jax.jit(f_)
    x = jnp.ones((b, d), jnp.float32)
    jax.block_until_ready(fn(x, ws))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); jax.block_until_ready(fn(x, ws)); ts.append(time.perf_counter() - t0)
    best = min(ts)
    print(f"{name:8s} parts={parts} b={b}: {best*1e3:6.2f} ms {nbytes/best/1e9:5.1f} GB/s (median {np.median(ts)*1e3:.2f})", flush=True)

for rnd in range(2):
    for b in (1, 8):
        for parts in (1, 2, 4):
            run("presplit", parts, b)
