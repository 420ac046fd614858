"""30 layers of [b,576]x[576,1536] and [b,1536]x[1536,576] in four weight layouts, ynn off."""
import time, jax, jax.numpy as jnp, numpy as np
from jax import lax
L, d, f = 30, 576, 1536
rng = np.random.default_rng(0)
W1 = [jnp.asarray(rng.standard_normal((d, f), np.float32) * .02) for _ in range(L)]
W2 = [jnp.asarray(rng.standard_normal((f, d), np.float32) * .02) for _ in range(L)]
T1 = [jnp.asarray(np.ascontiguousarray(np.asarray(w).T)) for w in W1]
T2 = [jnp.asarray(np.ascontiguousarray(np.asarray(w).T)) for w in W2]
def kn(x, A, B):
    for a, c in zip(A, B): x = x + jnp.tanh(x @ a) @ c
    return x
def nt(x, A, B):  # weights [n,k], contract minor axes
    for a, c in zip(A, B):
        h = lax.dot_general(x, a, (((1,), (1,)), ((), ())))
        x = x + lax.dot_general(jnp.tanh(h), c, (((1,), (1,)), ((), ())))
    return x
def tn(x, A, B):  # y^T = W^T x^T, activations kept transposed [k,b]
    xt = x.T
    for a, c in zip(A, B): xt = xt + c @ jnp.tanh(a @ xt)
    return xt.T
opts = {"xla_cpu_experimental_ynn_fusion_type": ""}
variants = {"x@W [k,n]": (kn, W1, W2), "x.Wt^T [n,k]": (nt, T1, T2), "Wt@x^T [n,k]": (tn, T1, T2)}
for b in (8, 1):
    x = jnp.ones((b, d), jnp.float32) * .1
    fns = {k: (jax.jit(fn, compiler_options=opts), A, B) for k, (fn, A, B) in variants.items()}
    best = {k: 1e9 for k in fns}
    for k, (fn, A, B) in fns.items(): jax.block_until_ready(fn(x, A, B))
    for _ in range(7):
        for k, (fn, A, B) in fns.items():
            t0 = time.perf_counter(); jax.block_until_ready(fn(x, A, B)); best[k] = min(best[k], time.perf_counter() - t0)
    for k, t in best.items():
        print(f"b={b} {k:14s} {t*1e3:7.2f} ms {2*b*2*d*f*L/t/1e9:6.1f} GFLOPS {4*2*d*f*L/t/1e9:5.1f} GB/s", flush=True)
