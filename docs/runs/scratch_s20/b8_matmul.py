"""Formulations of x [8, K] @ W [K, N] float32 on XLA CPU (YNNPACK fusions off, as the
library's decode compiles): the plain dot; a lax.map over N-chunks of W (each chunk's
8-row GEMM packs from a cache-resident slice); 8 GEMVs; a multiply-and-reduce.
(scratch, not maintained): python docs/runs/scratch_s20/b8_matmul.py"""
import statistics, time
import jax, jax.numpy as jnp

OPTS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def chunked(n_chunk):
    def f(x, w):
        k, n = w.shape
        wc = w.reshape(k, n // n_chunk, n_chunk).transpose(1, 0, 2)  # [c, k, n_chunk] (a copy outside timing? no: inside)
        return jnp.moveaxis(jax.lax.map(lambda wi: x @ wi, wc), 0, 1).reshape(x.shape[0], n)
    return f


def chunked_slices(n_chunk):
    def f(x, w):
        k, n = w.shape
        def one(i):
            return x @ jax.lax.dynamic_slice_in_dim(w, i * n_chunk, n_chunk, axis=1)
        return jnp.moveaxis(jax.lax.map(one, jnp.arange(n // n_chunk)), 0, 1).reshape(x.shape[0], n)
    return f


forms = {
    "dot": lambda x, w: x @ w,
    "gemv x8": lambda x, w: jnp.stack([x[i] @ w for i in range(x.shape[0])]),
    "mul-reduce": lambda x, w: jnp.sum(x[:, :, None] * w[None], axis=1),
    "map slices 1024": chunked_slices(1024),
    "map slices 4096": chunked_slices(4096),
    "map slices 256": chunked_slices(256),
}
for k, n in ((576, 49152), (576, 1536), (1536, 576)):
    w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (8, k), jnp.float32)
    ref = x @ w
    for name, fn in forms.items():
        if n % 1024 and "slices" in name and int(name.split()[-1]) > n:
            continue
        if "slices" in name and n % int(name.split()[-1]):
            continue
        f = jax.jit(fn, compiler_options=OPTS).lower(x, w).compile()
        out = jax.block_until_ready(f(x, w))
        err = float(jnp.max(jnp.abs(out - ref)))
        ts = []
        for _ in range(40):
            t0 = time.perf_counter(); jax.block_until_ready(f(x, w)); ts.append(time.perf_counter() - t0)
        print(f"W {k}x{n} {name:16s} best {min(ts) * 1e3:7.3f} ms median {statistics.median(ts) * 1e3:7.3f} ms "
              f"({w.nbytes / min(ts) / 1e9:5.1f} GB/s) max err {err:.1e}", flush=True)
