#!/usr/bin/env python
"""A decode step's attention over the KV cache, grouped or one query head at a time, side by side.

One decode step's attention (a query token over S cached slots plus itself, GQA with
SmolLM2's 3 KV heads × 3 query heads × 64) for 30 layers, with
- "grouped", the form before: per KV head, the group's `[g, h] @ k [h, s]` and
  `p [g, s] @ v [s, h]` (written here, as it was);
- "per head", `models.decoder.dense_attention` (`_step_attention`, the library's code):
  one query head of each group at a time, `q [h] @ k [h, s]` and `p [s] @ v [s, h]`.
Both are compiled in one process, checked against each other and timed in interleaved
rounds. A scratch A/B for choosing the form, not a benchmark to quote; `bench_decode.py`
measures whole decodes.

    python scripts/ab_step_attention.py            # b=8 over 528 slots, b=1 over 528 and 2,064
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


def grouped(qg, k, v, valid, cache):
    """The step before: each KV head's query group as one `[g, h]` matrix."""
    ck, cv, cvalid = cache
    q = qg[:, 0]  # [b,k,g,h]
    own = jnp.where(valid[:, :, None], jnp.sum(q * k[:, 0, :, None, :], axis=-1), _MASKED)
    cs = jnp.where(cvalid[:, None, None, :], jnp.einsum("bkgh,bkhs->bkgs", q, ck), _MASKED)
    m = jnp.maximum(jnp.max(cs, axis=-1), own)
    e, e_own = jnp.exp(cs - m[..., None]), jnp.exp(own - m)
    o = jnp.einsum("bkgs,bksh->bkgh", e, cv) + e_own[..., None] * v[:, 0, :, None, :]
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
    fns = {"grouped": layers(grouped), "per head": layers(per_head)}
    for b, s in ((8, 528), (1, 528), (1, 2064)):
        keys = jax.random.split(jax.random.PRNGKey(0), 5)
        q = jax.random.normal(keys[0], (LAYERS, b, 1, KV_HEADS, GROUP, HEAD_DIM)) * HEAD_DIM**-0.5
        k = jax.random.normal(keys[1], (LAYERS, b, 1, KV_HEADS, HEAD_DIM))
        v = jax.random.normal(keys[2], (LAYERS, b, 1, KV_HEADS, HEAD_DIM))
        ck = jax.random.normal(keys[3], (LAYERS, b, KV_HEADS, HEAD_DIM, s))
        cv = jax.random.normal(keys[4], (LAYERS, b, KV_HEADS, s, HEAD_DIM))
        cvalid = jnp.ones((b, s), bool).at[:, s - 16 :].set(False)  # the unused tail of a cache
        out = {n: float(f(q, k, v, ck, cv, cvalid)) for n, f in fns.items()}  # compiles
        if not np.isclose(out["grouped"], out["per head"], rtol=1e-4):
            raise SystemExit(f"the two forms disagree: {out}")
        times = {n: [] for n in fns}
        for _ in range(9):
            for n, f in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(q, k, v, ck, cv, cvalid))
                times[n].append(time.perf_counter() - t0)
        line = ", ".join(f"{n} best {1e3 * min(ts):.2f} ms median {1e3 * float(np.median(ts)):.2f} ms" for n, ts in times.items())
        ratio = min(times["grouped"]) / min(times["per head"])
        print(f"b={b}, {s} slots, {LAYERS} layers: {line}; grouped ÷ per head (best) {ratio:.2f}×", flush=True)


if __name__ == "__main__":
    main()
