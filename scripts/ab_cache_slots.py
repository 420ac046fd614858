#!/usr/bin/env python
"""A decode step against KV caches of different sizes holding the same few tokens, side by side.

Attention reads every slot of the cache, used or not (the unused ones are masked), so a
step's cost follows the cache's size, not the conversation's length. This is why a
context+memory `Session` sizes its cache to what the conversation needs (512 slots,
doubled as it grows, up to `max_context`) instead of preallocating `max_context`.
Greedy decodes of 16 steps (b=1, the embedded SmolLM2) after a 64-token prompt, in
interleaved rounds, checked to give the same tokens. A scratch A/B, not a benchmark.

    python scripts/ab_cache_slots.py --slots 256,1024,4096
"""

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deltamem_jax.cli import load_backbone
from deltamem_jax.decoding import decode, prefill
from models.decoder import KVCache


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", default="256,1024,4096", help="cache sizes, comma-separated")
    ap.add_argument("--tokens", type=int, default=64, help="prompt tokens in the cache")
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    sizes = [int(s) for s in args.slots.split(",")]
    t, steps = args.tokens, 16
    model, _ = load_backbone()
    cfg = model.cfg
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; b=1, {t} tokens in the cache")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, t)), jnp.int32)
    positions, valid = jnp.arange(t, dtype=jnp.int32)[None], jnp.ones((1, t), bool)
    start = {n: prefill(model, tokens, positions, valid, KVCache.create(cfg, 1, n), None) for n in sizes}
    times, out = {n: [] for n in sizes}, {}
    for r in range(args.rounds + 1):  # the first round compiles
        for n in sizes:
            state = jax.tree.map(jnp.copy, start[n])
            t0 = time.perf_counter()
            out[n] = np.asarray(jax.block_until_ready(decode(model, state, steps)[1]))
            if r:
                times[n].append((time.perf_counter() - t0) / steps)
    if any((out[n] != out[sizes[0]]).any() for n in sizes):
        raise SystemExit("the cache sizes decoded different tokens")
    for n in sizes:
        best, median = min(times[n]), float(np.median(times[n]))
        print(f"{n:5d} slots: best {1e3 * best:.2f} ms a step ({1 / best:.1f} tok/s), median {1e3 * median:.2f} ms; "
              f"÷ {sizes[0]} slots (best) {best / min(times[sizes[0]]):.2f}×")


if __name__ == "__main__":
    main()
