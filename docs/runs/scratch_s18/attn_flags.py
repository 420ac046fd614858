"""Prompt attention (library blockwise_attention, 30 layers, b=1) under XLA CPU option sets."""
import sys, time
sys.path.insert(0, ".")
import jax, jax.numpy as jnp, numpy as np
from deltamem_jax.forward import CPU_COMPILE_OPTIONS
from models.decoder import blockwise_attention
T = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
L, K, G, H = 30, 3, 3, 64
rng = np.random.default_rng(0)
q = jnp.asarray(rng.standard_normal((L, 1, T, K, G, H), np.float32) * 0.125)
k = jnp.asarray(rng.standard_normal((L, 1, T, K, H), np.float32))
v = jnp.asarray(rng.standard_normal((L, 1, T, K, H), np.float32))
valid = jnp.ones((1, T), bool)
def run(q, k, v):
    def one(c, xs):
        qi, ki, vi = xs
        return c + jnp.sum(blockwise_attention(qi + 0 * c, ki, vi, valid, None)), None
    return jax.lax.scan(one, 0.0, (q, k, v))[0]
sets = {
    "base": dict(CPU_COMPILE_OPTIONS),
    "fast_min_max": dict(CPU_COMPILE_OPTIONS, xla_cpu_enable_fast_min_max=True),
    "fast_math": dict(CPU_COMPILE_OPTIONS, xla_cpu_enable_fast_math=True),
}
fns = {n: jax.jit(run, compiler_options=o) for n, o in sets.items()}
ref = None
for n, f in fns.items():
    out = float(f(q, k, v))
    print(n, "value", out)
res = {n: [] for n in fns}
for r in range(3):
    for n, f in fns.items():
        t0 = time.perf_counter(); jax.block_until_ready(f(q, k, v)); res[n].append(time.perf_counter() - t0)
for n in fns:
    print(f"{n:14s} T={T}: best {min(res[n]):.3f} s  all {[round(x,3) for x in res[n]]}")
