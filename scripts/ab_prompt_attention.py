#!/usr/bin/env python
"""Blockwise prompt attention in two score layouts and several block sizes, side by side.

A prompt's causal GQA attention (SmolLM2's 3 KV heads × 3 query heads × 64, b = 1) for
30 layers, with
- "minor q512 k512", the layout before: each score block `[queries, keys]`, the softmax's
  max and sum reduced over its minor axis (written here, as it was);
- "keys-major qQ kK", `models.decoder.blockwise_attention` (scores `[keys, queries]`, the
  max over a major axis, the sum from a ones row in the value product) with query
  blocks of Q and key blocks of K tokens.
All are compiled in one process, checked against each other and timed in interleaved
rounds. A scratch A/B for choosing the layout and `QUERY_BLOCK`, not a benchmark to quote;
`bench_decode.py` measures whole prefills.

    python scripts/ab_prompt_attention.py --tokens 2048
"""

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deltamem_jax.forward import jit_for_backend
from models.decoder import _MASKED, blockwise_attention

LAYERS, KV_HEADS, GROUP, HEAD_DIM = 30, 3, 3, 64


def minor_axis_attention(qg, k, v, valid, block=512):
    """The blockwise attention before (no cache): score blocks [b,k,gB,B], reduced over B."""
    b, t, kvh, g, h = qg.shape
    nb = -(-t // block)
    pad = nb * block - t
    keys = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b, kvh, nb, block, h).transpose(2, 0, 1, 3, 4)
    values = jnp.pad(v.transpose(0, 2, 3, 1), ((0, 0), (0, 0), (0, 0), (0, pad))).reshape(b, kvh, h, nb, block).transpose(3, 0, 1, 2, 4)
    kvalid = jnp.pad(valid, ((0, 0), (0, pad))).reshape(b, nb, block).transpose(1, 0, 2)
    qblocks = jnp.pad(qg, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    qblocks = qblocks.reshape(b, nb, block, kvh, g, h).transpose(1, 0, 3, 4, 2, 5).reshape(nb, b, kvh, g * block, h)
    offsets, rows = jnp.arange(block), jnp.tile(jnp.arange(block), g)

    def one_query_block(args):
        qb, qi = args

        def one_key_block(carry, xs):
            kb, vb, kv_ok, ki = xs

            def update(carry):
                m, l, acc = carry
                allowed = kv_ok[:, None, None, :] & (ki * block + offsets[None, :] <= qi * block + rows[:, None])
                sc = jnp.where(allowed, jnp.einsum("bkqh,bksh->bkqs", qb, kb), _MASKED)
                m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
                p = jnp.exp(sc - m_new[..., None])
                scale = jnp.exp(m - m_new)
                return m_new, l * scale + jnp.sum(p, axis=-1), acc * scale[..., None] + jnp.einsum("bkqs,bkhs->bkqh", p, vb)

            return jax.lax.cond((ki <= qi) & jnp.any(kv_ok), update, lambda c: c, carry), None

        init = (jnp.full((b, kvh, g * block), _MASKED), jnp.zeros((b, kvh, g * block)), jnp.zeros((b, kvh, g * block, h)))
        (_, l, acc), _ = jax.lax.scan(one_key_block, init, (keys, values, kvalid, jnp.arange(nb)))
        return acc / l[..., None]

    out = jax.lax.map(one_query_block, (qblocks, jnp.arange(nb)))
    return out.reshape(nb, b, kvh, g, block, h).transpose(1, 0, 4, 2, 3, 5).reshape(b, nb * block, kvh, g, h)[:, :t]


def layers(fn):
    """All layers' attention in a scan, summed to a scalar (each layer its own q, k, v)."""

    def run(q, k, v, valid):
        def one(c, xs):
            return c + jnp.sum(fn(xs[0] + 0 * c, xs[1], xs[2], valid)), None

        return jax.lax.scan(one, 0.0, (q, k, v))[0]

    return jit_for_backend(run)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    t = args.tokens
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (LAYERS, 1, t, KV_HEADS, GROUP, HEAD_DIM)) * HEAD_DIM**-0.5
    k = jax.random.normal(keys[1], (LAYERS, 1, t, KV_HEADS, HEAD_DIM))
    v = jax.random.normal(keys[2], (LAYERS, 1, t, KV_HEADS, HEAD_DIM))
    valid = jnp.ones((1, t), bool)
    variants = {"minor q512 k512": minor_axis_attention}
    for qb, kb in ((512, 512), (256, 512), (128, 512), (256, 256), (256, 1024)):
        variants[f"keys-major q{qb} k{kb}"] = lambda q_, k_, v_, va, qb=qb, kb=kb: blockwise_attention(q_, k_, v_, va, None, kb, qb)
    ref = jax.jit(minor_axis_attention)(q[0], k[0], v[0], valid)
    fns = {}
    for name, fn in variants.items():
        err = float(jnp.max(jnp.abs(jax.jit(fn)(q[0], k[0], v[0], valid) - ref)))
        if err > 1e-5:
            raise SystemExit(f"{name} differs from the layout before by {err:.2e}")
        fns[name] = layers(fn)
        fns[name](q, k, v, valid).block_until_ready()  # compiles
    times = {n: [] for n in fns}
    for _ in range(args.rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f(q, k, v, valid).block_until_ready()
            times[name].append(time.perf_counter() - t0)
    base = min(times["minor q512 k512"])
    print(f"jax {jax.__version__}, b=1, {t} tokens, {LAYERS} layers, best / median of {args.rounds} interleaved rounds")
    for name, ts in times.items():
        print(f"{name:22s} best {min(ts):.3f} s  median {float(np.median(ts)):.3f} s  ({min(ts) / base:.2f}× the layout before)")


if __name__ == "__main__":
    main()
