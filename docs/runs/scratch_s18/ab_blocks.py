import sys, time
sys.path.insert(0, ".")
import jax, jax.numpy as jnp, numpy as np
from deltamem_jax.forward import jit_for_backend
from models.decoder import blockwise_attention
L, K, G, H = 30, 3, 3, 64
t = int(sys.argv[1]); pairs = [tuple(int(x) for x in p.split("x")) for p in sys.argv[2].split(",")]; rounds = int(sys.argv[3])
ks = jax.random.split(jax.random.PRNGKey(0), 3)
q = jax.random.normal(ks[0], (L, 1, t, K, G, H)) * H**-0.5
k = jax.random.normal(ks[1], (L, 1, t, K, H)); v = jax.random.normal(ks[2], (L, 1, t, K, H))
valid = jnp.ones((1, t), bool)
def layers(qb, kb):
    def run(q, k, v):
        def one(c, xs):
            return c + jnp.sum(blockwise_attention(xs[0] + 0 * c, xs[1], xs[2], valid, None, kb, qb)), None
        return jax.lax.scan(one, 0.0, (q, k, v))[0]
    return jit_for_backend(run)
fns = {p: layers(*p) for p in pairs}
for f in fns.values(): f(q, k, v).block_until_ready()
times = {p: [] for p in fns}
for _ in range(rounds):
    for p, f in fns.items():
        t0 = time.perf_counter(); f(q, k, v).block_until_ready(); times[p].append(time.perf_counter() - t0)
for p, ts in times.items():
    print(f"t={t} q{p[0]} k{p[1]}: best {min(ts):.3f} s median {np.median(ts):.3f}", flush=True)
