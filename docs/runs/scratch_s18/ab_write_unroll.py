import sys, time, functools
sys.path.insert(0, ".")
import jax, jax.numpy as jnp, numpy as np
from deltamem_jax import delta_rule
from deltamem_jax.forward import jit_for_backend
L, T, R = 30, 1024, 8
def make(m, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32) * 0.3)
    x = delta_rule.WriteInputs(q=f(L, 1, T, m, R), k=f(L, 1, T, m, R), v=f(L, 1, T, m, R),
                               beta=jax.nn.sigmoid(f(L, 1, T, m, R)), mu=jnp.ones((L, 1, T, m, R)) * 0.5, lam=jax.nn.sigmoid(f(L, 1, T, m, R)) * 0.1 + 0.9)
    return x
def writer(unroll):
    def scan_write(state, x, valid):
        x = delta_rule.mask_invalid(x, valid)
        def body(s, xt):
            r_t, s = delta_rule._step(s, xt)
            return s, r_t
        final, reads = jax.lax.scan(body, state, jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), x), unroll=unroll)
        return jnp.where(valid[:, :, None, None], jnp.moveaxis(reads, 0, 1), 0.0), final
    def run(x, valid):
        def layer(c, xl):
            reads, final = scan_write(jnp.zeros((1, xl.q.shape[2], R, R)), xl, valid)
            return c + jnp.sum(reads) + jnp.sum(final), None
        return jax.lax.scan(layer, 0.0, x)[0]
    return jit_for_backend(run)
print("fields", delta_rule.WriteInputs._fields if hasattr(delta_rule.WriteInputs, "_fields") else "")
for m in (1, 4):
    x = make(m); valid = jnp.ones((1, T), bool)
    fns = {u: writer(u) for u in (1, 4, 8, 16)}
    out = {u: float(f(x, valid)) for u, f in fns.items()}
    times = {u: [] for u in fns}
    for _ in range(5):
        for u, f in fns.items():
            t0 = time.perf_counter(); jax.block_until_ready(f(x, valid)); times[u].append(time.perf_counter() - t0)
    print(f"m={m}: " + ", ".join(f"unroll {u}: {min(t)*1e3:.1f} ms" for u, t in times.items()), {u: round(v, 3) for u, v in out.items()}, flush=True)
