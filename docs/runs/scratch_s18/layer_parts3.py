import sys, time
import jax, jax.numpy as jnp, numpy as np
L, d, f = 30, 576, 1536
rng = np.random.default_rng(0)
def cblocks(w, P): return [jnp.asarray(np.ascontiguousarray(b)) for b in np.array_split(w, P, axis=1)]
def rblocks(w, P): return [jnp.asarray(np.ascontiguousarray(b)) for b in np.array_split(w, P, axis=0)]
def mmc(x, ws): return jnp.concatenate([jnp.einsum("...m,mn->...n", x, w) for w in ws], axis=-1)
def mmr(x, ws):
    xs = jnp.split(x, np.cumsum([w.shape[0] for w in ws])[:-1], axis=-1)
    out = jnp.einsum("...m,mn->...n", xs[0], ws[0])
    for xi, w in zip(xs[1:], ws[1:]): out = out + jnp.einsum("...m,mn->...n", xi, w)
    return out
def norm(x): return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
raw = [dict(gu=rng.standard_normal((d, 2 * f), np.float32) * .02, down=rng.standard_normal((f, d), np.float32) * .02,
            qkv=rng.standard_normal((d, 960), np.float32) * .02, o=rng.standard_normal((d, d), np.float32) * .02) for _ in range(L)]
nbytes = sum(w.nbytes for r in raw for w in r.values())
def run(name, spec, b, steps=8):
    # spec: per weight (mode, P) mode c=columns r=rows
    layers = [{k: (cblocks if spec[k][0] == "c" else rblocks)(v, spec[k][1]) for k, v in r.items()} for r in raw]
    mm = lambda x, k, w: (mmc if spec[k][0] == "c" else mmr)(x, w[k])
    def body(x, layers):
        for w in layers:
            z = mm(norm(x), "qkv", w)
            x = x + mm(z[..., :576] * jnp.tanh(z[..., 576:577]), "o", w)
            g, u = jnp.split(mm(norm(x), "gu", w), 2, axis=-1)
            x = x + mm(jax.nn.silu(g) * u, "down", w)
        return x
    fn = jax.jit(lambda x, layers: jax.lax.fori_loop(0, steps, lambda i, x: body(x, layers), x))
    x = jnp.ones((b, 1, d), jnp.float32)
    jax.block_until_ready(fn(x, layers))
    ts = []
    for _ in range(8):
        t0 = time.perf_counter(); jax.block_until_ready(fn(x, layers)); ts.append((time.perf_counter() - t0) / steps)
    print(f"{name:28s} b={b}: {min(ts)*1e3:6.2f} ms/step {nbytes/min(ts)/1e9:5.1f} GB/s", flush=True)
specs = {
    "none": dict(qkv=("c", 1), o=("c", 1), gu=("c", 1), down=("c", 1)),
    "gu c2": dict(qkv=("c", 1), o=("c", 1), gu=("c", 2), down=("c", 1)),
    "gu c2 down r2": dict(qkv=("c", 1), o=("c", 1), gu=("c", 2), down=("r", 2)),
    "gu c2 down r2 qkv c2": dict(qkv=("c", 2), o=("c", 1), gu=("c", 2), down=("r", 2)),
    "gu c2 down r2 qkv c2 o r2": dict(qkv=("c", 2), o=("r", 2), gu=("c", 2), down=("r", 2)),
}
for b in (1, 8):
    for name, spec in specs.items():
        run(name, spec, b)
