"""Per shape: 30 chained x@W (W [k,n]) against x·Wt^T (Wt [n,k]), b=1 and 8, ynn off."""
import sys, time, jax, jax.numpy as jnp, numpy as np
from jax import lax
rng = np.random.default_rng(0)
opts = {"xla_cpu_experimental_ynn_fusion_type": ""}
shapes = [(576, 960), (576, 576), (576, 1536), (1536, 576), (576, 3072)]
L = 30
for k, n in shapes:
    W = [jnp.asarray(rng.standard_normal((k, n), np.float32) * .02) for _ in range(L)]
    T = [jnp.asarray(np.ascontiguousarray(np.asarray(w).T)) for w in W]
    P = jnp.asarray(rng.standard_normal((n, k), np.float32) * .02)  # back to k (small)
    def kn(x, A):
        for a in A: x = x + jnp.tanh(x @ a)[:, :k] if n >= k else x + jnp.tanh(x @ a).sum()
        return x
    def nt(x, A):
        for a in A:
            h = lax.dot_general(x, a, (((1,), (1,)), ((), ())))
            x = x + jnp.tanh(h)[:, :k] if n >= k else x + jnp.tanh(h).sum()
        return x
    for b in (1, 8):
        x = jnp.ones((b, k), jnp.float32) * .1
        fa, fb = jax.jit(kn, compiler_options=opts), jax.jit(nt, compiler_options=opts)
        jax.block_until_ready(fa(x, W)); jax.block_until_ready(fb(x, T))
        ta = tb = 1e9
        for _ in range(9):
            t0 = time.perf_counter(); jax.block_until_ready(fa(x, W)); ta = min(ta, time.perf_counter() - t0)
            t0 = time.perf_counter(); jax.block_until_ready(fb(x, T)); tb = min(tb, time.perf_counter() - t0)
        gb = 4 * k * n * L / 1e9
        print(f"[{k},{n}] b={b}: [k,n] {ta*1e3:6.2f} ms {gb/ta:5.1f} GB/s | [n,k] {tb*1e3:6.2f} ms {gb/tb:5.1f} GB/s", flush=True)
