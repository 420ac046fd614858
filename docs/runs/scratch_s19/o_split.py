"""30 chained [1,576]@[576,576] matvecs (o_proj shape): one dot, N halves, K halves; ynn off."""
import time, jax, jax.numpy as jnp, numpy as np
rng = np.random.default_rng(0)
L, d = 30, 576
W = [jnp.asarray(rng.standard_normal((d, d), np.float32) * .04) for _ in range(L)]
Wn = [(w[:, :d // 2], w[:, d // 2:]) for w in W]
Wk = [(w[:d // 2], w[d // 2:]) for w in W]
Wn = jax.tree.map(lambda a: jnp.asarray(np.ascontiguousarray(a)), Wn)
Wk = jax.tree.map(lambda a: jnp.asarray(np.ascontiguousarray(a)), Wk)
def one(x, W):
    for w in W: x = jnp.tanh(x @ w)
    return x
def nsplit(x, W):
    for a, b in W: x = jnp.tanh(jnp.concatenate([x @ a, x @ b], -1))
    return x
def ksplit(x, W):
    for a, b in W: x = jnp.tanh(x[:, :d // 2] @ a + x[:, d // 2:] @ b)
    return x
opts = {"xla_cpu_experimental_ynn_fusion_type": ""}
fns = {"one": (jax.jit(one, compiler_options=opts), W), "n halves": (jax.jit(nsplit, compiler_options=opts), Wn), "k halves": (jax.jit(ksplit, compiler_options=opts), Wk)}
x = jnp.ones((1, d)) * .1
best = {k: 1e9 for k in fns}
for k, (f, w) in fns.items(): jax.block_until_ready(f(x, w))
for _ in range(15):
    for k, (f, w) in fns.items():
        t0 = time.perf_counter(); jax.block_until_ready(f(x, w)); best[k] = min(best[k], time.perf_counter() - t0)
for k, t in best.items(): print(f"{k:10s} {t*1e3:6.3f} ms  {4*d*d*L/t/1e9:5.1f} GB/s")
