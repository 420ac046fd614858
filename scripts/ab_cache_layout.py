#!/usr/bin/env python
"""Decode attention over the KV cache in two cache layouts and two forms, side by side.

One decode step's attention (a query token over S cached slots plus itself, GQA with
SmolLM2's 3 KV heads × 3 query heads × 64) for 30 layers, with
- "per head", today's: the `KVCache` layout, k [b,k,h,s] and v [b,k,s,h], one query head
  of each group at a time, `q [h] @ k [h, s]` and `p [s] @ v [s, h]`
  (`models.decoder.dense_attention`, the library's code);
- "grouped", the form before in the same layout: each KV head's query group as one
  matrix, `q [g, h] @ k [h, s]` and `p [g, s] @ v [s, h]` (written here);
- "kv-nt grouped", the layout before that, k [b,k,s,h] and v [b,k,h,s], grouped: both
  products contract over the minor axis of the cache (written here).
The model's own figures come from `scripts/profile_decode.py` (attention's ms per step).
All are compiled in one process, checked against each other and timed in interleaved
rounds. A scratch A/B for choosing the layout and form, not a benchmark to quote;
`bench_decode.py` measures whole decodes. (Until 4407a3a "grouped" was the library's form
and this script compared the two layouts only; `scripts/ab_step_attention.py`, merged in
here since, compared the two forms.)

    python scripts/ab_cache_layout.py            # b=8 over 528 slots, b=1 over 528 and 2,064
"""

import functools
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


def grouped(qg, k, v, valid, cache, nt: bool = False):
    """The step before `models.decoder._step_attention`'s per-head form: each KV head's
    query group as one `[g, h]` matrix; with `nt`, over k [b,k,s,h] and v [b,k,h,s]."""
    ck, cv, cvalid = cache
    q = qg[:, 0]  # [b,k,g,h]
    own = jnp.where(valid[:, :, None], jnp.sum(q * k[:, 0, :, None, :], axis=-1), _MASKED)
    cs = jnp.einsum("bkgh,bksh->bkgs" if nt else "bkgh,bkhs->bkgs", q, ck)
    cs = jnp.where(cvalid[:, None, None, :], cs, _MASKED)
    m = jnp.maximum(jnp.max(cs, axis=-1), own)
    e, e_own = jnp.exp(cs - m[..., None]), jnp.exp(own - m)
    o = jnp.einsum("bkgs,bkhs->bkgh" if nt else "bkgs,bksh->bkgh", e, cv) + e_own[..., None] * v[:, 0, :, None, :]
    return (o / (jnp.sum(e, axis=-1) + e_own)[..., None])[:, None]


def per_head(qg, k, v, valid, cache):
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
    fns = {"per head": layers(per_head), "grouped": layers(grouped), "kv-nt grouped": layers(functools.partial(grouped, nt=True))}
    for b, s in ((8, 528), (1, 528), (1, 2064)):
        keys = jax.random.split(jax.random.PRNGKey(0), 5)
        q = jax.random.normal(keys[0], (LAYERS, b, 1, KV_HEADS, GROUP, HEAD_DIM)) * HEAD_DIM**-0.5
        k = jax.random.normal(keys[1], (LAYERS, b, 1, KV_HEADS, HEAD_DIM))
        v = jax.random.normal(keys[2], (LAYERS, b, 1, KV_HEADS, HEAD_DIM))
        k_hs = jax.random.normal(keys[3], (LAYERS, b, KV_HEADS, HEAD_DIM, s))  # keys as [.., h, s]
        v_sh = jax.random.normal(keys[4], (LAYERS, b, KV_HEADS, s, HEAD_DIM))  # values as [.., s, h]
        cvalid = jnp.ones((b, s), bool).at[:, s - 16 :].set(False)  # the unused tail of a cache
        nn, nt = (k_hs, v_sh), (jnp.swapaxes(k_hs, -1, -2), jnp.swapaxes(v_sh, -1, -2))
        inputs = {"per head": nn, "grouped": nn, "kv-nt grouped": nt}
        out = {n: float(f(q, k, v, *inputs[n], cvalid)) for n, f in fns.items()}  # compiles
        if not all(np.isclose(x, out["per head"], rtol=1e-4) for x in out.values()):
            raise SystemExit(f"the forms disagree: {out}")
        times = {n: [] for n in fns}
        for _ in range(9):
            for n, f in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(q, k, v, *inputs[n], cvalid))
                times[n].append(time.perf_counter() - t0)
        cache_bytes = 2 * k_hs.nbytes
        line = ", ".join(
            f"{n} best {1e3 * min(ts):.2f} ms median {1e3 * float(np.median(ts)):.2f} ms ({cache_bytes / min(ts) / 1e9:.1f} GB/s of cache)"
            for n, ts in times.items()
        )
        ratios = ", ".join(f"{n} {min(times[n]) / min(times['per head']):.2f}×" for n in fns if n != "per head")
        print(f"b={b}, {s} slots, {LAYERS} layers: {line}; ÷ per head (best): {ratios}", flush=True)


if __name__ == "__main__":
    main()
