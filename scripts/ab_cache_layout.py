#!/usr/bin/env python
"""Decode attention over the KV cache in two cache layouts, side by side.

One decode step's attention (a query token over S cached slots plus itself, GQA with
SmolLM2's 3 KV heads × 3 query heads × 64) for 30 layers, with
- "kv-nn", today's `KVCache` layout, k [b,k,h,s] and v [b,k,s,h]: both products plain
  matmuls (`models.decoder.dense_attention`, the library's code);
- "kv-nt", the layout before, k [b,k,s,h] and v [b,k,h,s]: both products contract over
  the minor axis of the cache (the same steps, written here).
The model's own figures come from `scripts/profile_decode.py` (attention's ms per step).
Both are compiled in one process and timed in interleaved rounds. A scratch A/B for
choosing the layout, not a benchmark to quote; `bench_decode.py` measures whole decodes.

    python scripts/ab_cache_layout.py            # b=8 over 528 slots and b=1 over 2,064
"""

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deltamem_jax.forward import jit_for_backend
from models.decoder import _MASKED, dense_attention

LAYERS, KV_HEADS, GROUP, HEAD_DIM = 30, 3, 3, 64


def attention_kv_nt(qg, k, v, valid, cache):
    """`models.decoder._step_attention`'s steps with k [b,k,s,h], v [b,k,h,s] (the layout
    before): both cache products contract over the cache's minor axis."""
    ck, cv, cvalid = cache
    q = qg[:, 0]
    own = jnp.where(valid[:, :, None], jnp.sum(q * k[:, 0, :, None, :], axis=-1), _MASKED)
    cs = jnp.where(cvalid[:, None, None, :], jnp.einsum("bkgh,bksh->bkgs", q, ck), _MASKED)
    m = jnp.maximum(jnp.max(cs, axis=-1), own)
    e, e_own = jnp.exp(cs - m[..., None]), jnp.exp(own - m)
    o = jnp.einsum("bkgs,bkhs->bkgh", e, cv) + e_own[..., None] * v[:, 0, :, None, :]
    return (o / (jnp.sum(e, axis=-1) + e_own)[..., None])[:, None]


def attention_kv_nn(qg, k, v, valid, cache):
    ck, cv, cvalid = cache
    return dense_attention(qg, k, v, valid, (ck, cv, cvalid, None))


def layers(fn):
    """All layers' attention in a scan (each layer its own cache), summed to a scalar."""

    def run(q, k, v, ck, cv, cvalid):
        valid = jnp.ones(q.shape[1:3], bool)

        def one(c, xs):
            qi, ki, vi, cki, cvi = xs
            return c + jnp.sum(fn(qi + 0 * c, ki, vi, valid, (cki, cvi, cvalid))), None

        return jax.lax.scan(one, 0.0, (q, k, v, ck, cv))[0]

    return jit_for_backend(run)


def main():
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    for b, s in ((8, 528), (1, 2064)):
        keys = jax.random.split(jax.random.PRNGKey(0), 5)
        q = jax.random.normal(keys[0], (LAYERS, b, 1, KV_HEADS, GROUP, HEAD_DIM)) * HEAD_DIM**-0.5
        k = jax.random.normal(keys[1], (LAYERS, b, 1, KV_HEADS, HEAD_DIM))
        v = jax.random.normal(keys[2], (LAYERS, b, 1, KV_HEADS, HEAD_DIM))
        k_sh = jax.random.normal(keys[3], (LAYERS, b, KV_HEADS, s, HEAD_DIM))  # keys as [.., s, h]
        v_hs = jax.random.normal(keys[4], (LAYERS, b, KV_HEADS, HEAD_DIM, s))  # values as [.., h, s]
        cvalid = jnp.ones((b, s), bool).at[:, s - 16 :].set(False)  # the unused tail of a cache
        inputs = {"kv-nt": (k_sh, v_hs), "kv-nn": (jnp.swapaxes(k_sh, -1, -2), jnp.swapaxes(v_hs, -1, -2))}
        fns = {"kv-nt": layers(attention_kv_nt), "kv-nn": layers(attention_kv_nn)}
        out = {n: float(f(q, k, v, *inputs[n], cvalid)) for n, f in fns.items()}  # compiles
        if not np.isclose(out["kv-nt"], out["kv-nn"], rtol=1e-4):
            raise SystemExit(f"the two layouts disagree: {out}")
        times = {n: [] for n in fns}
        for _ in range(9):
            for n, f in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(q, k, v, *inputs[n], cvalid))
                times[n].append(time.perf_counter() - t0)
        cache_bytes = 2 * k_sh.nbytes
        line = ", ".join(
            f"{n} best {1e3 * min(ts):.2f} ms median {1e3 * float(np.median(ts)):.2f} ms ({cache_bytes / min(ts) / 1e9:.1f} GB/s of cache)"
            for n, ts in times.items()
        )
        ratio = min(times["kv-nt"]) / min(times["kv-nn"])
        print(f"b={b}, {s} slots, {LAYERS} layers: {line}; kv-nt ÷ kv-nn (best) {ratio:.2f}×", flush=True)


if __name__ == "__main__":
    main()
