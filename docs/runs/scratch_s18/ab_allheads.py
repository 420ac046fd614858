"""Decode-step attention: per-KV-head batched dots (library) vs one GEMM over all KV heads
with the off-diagonal (other head) blocks masked: k stored [b,h,k,s], v [b,k,s,h]."""
import sys, time
sys.path.insert(0, ".")
import jax, jax.numpy as jnp, numpy as np
from deltamem_jax.forward import jit_for_backend
from models.decoder import _MASKED, dense_attention
L, K, G, H = 30, 3, 3, 64

def allheads(qg, k, v, valid, cache):
    ck_hks, cv, cvalid = cache  # ck [b,h,k,s], cv [b,k,s,h]
    b, _, kvh, g, h = qg.shape
    s = cvalid.shape[1]
    q = qg[:, 0].reshape(b, kvh * g, h)  # [b, kg, h]
    sc = jnp.einsum("bqh,bhn->bqn", q, ck_hks.reshape(b, h, kvh * s))  # [b, kg, k*s]
    own_head = (jnp.arange(kvh * g) // g)[:, None] == (jnp.arange(kvh * s) // s)[None, :]  # [kg, ks]
    ok = own_head[None] & jnp.tile(cvalid, (1, kvh))[:, None, :]
    sc = jnp.where(ok, sc, _MASKED)
    own = jnp.sum(qg[:, 0] * k[:, 0, :, None, :], axis=-1).reshape(b, kvh * g)
    m = jnp.maximum(jnp.max(sc, axis=-1), own)
    e, e_own = jnp.exp(sc - m[..., None]), jnp.exp(own - m)
    o = jnp.einsum("bqn,bnh->bqh", e, cv.reshape(b, kvh * s, h))
    o = o + e_own[..., None] * jnp.repeat(v[:, 0], g, axis=1)
    o = o / (jnp.sum(e, axis=-1) + e_own)[..., None]
    return o.reshape(b, 1, kvh, g, h)

def library(qg, k, v, valid, cache):
    ck, cv, cvalid = cache  # ck [b,k,h,s]
    return dense_attention(qg, k, v, valid, (ck, cv, cvalid, None))

def layers(fn):
    def run(q, k, v, ck, cv, cvalid):
        valid = jnp.ones(q.shape[1:3], bool)
        def one(c, xs):
            qi, ki, vi, cki, cvi = xs
            return c + jnp.sum(fn(qi + 0 * c, ki, vi, valid, (cki, cvi, cvalid))), None
        return jax.lax.scan(one, 0.0, (q, k, v, ck, cv))[0]
    return jit_for_backend(run)

for b, s in ((8, 528), (1, 2064)):
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    q = jax.random.normal(ks[0], (L, b, 1, K, G, H)) * H**-0.5
    k = jax.random.normal(ks[1], (L, b, 1, K, H)); v = jax.random.normal(ks[2], (L, b, 1, K, H))
    ck = jax.random.normal(ks[3], (L, b, K, H, s)); cv = jax.random.normal(ks[4], (L, b, K, s, H))
    cvalid = jnp.ones((b, s), bool).at[:, s - 16:].set(False)
    inputs = {"library": (ck, cv), "allheads": (jnp.transpose(ck, (0, 1, 3, 2, 4)), cv)}
    fns = {"library": layers(library), "allheads": layers(allheads)}
    out = {n: float(f(q, k, v, *inputs[n], cvalid)) for n, f in fns.items()}
    print(out)
    times = {n: [] for n in fns}
    for _ in range(9):
        for n, f in fns.items():
            t0 = time.perf_counter(); jax.block_until_ready(f(q, k, v, *inputs[n], cvalid)); times[n].append(time.perf_counter() - t0)
    print(f"b={b} s={s}: " + ", ".join(f"{n} best {min(t)*1e3:.2f} ms med {np.median(t)*1e3:.2f}" for n, t in times.items()), flush=True)
