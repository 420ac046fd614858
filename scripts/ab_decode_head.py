#!/usr/bin/env python
"""The LM head of decode's buffers, a tied embedding as [v, d] or transposed [d, v], side by side.

Two measurements on the embedded SmolLM2 (576 × 49,152, 113 MB of float32):
- the head alone, jitted `x @ E.T` (E [v, d], contracting its minor axis) against
  `x @ W` (W = E.T stored [d, v]), best of 20 calls each;
- whole greedy decodes (16 steps after a prompt, `decoding.decode` over the per-layer
  buffers) with the buffers' `head` (the library's default for a tied embedding) and with
  `head=None` (the embedding itself), in interleaved rounds, checked to give the same tokens.
A scratch A/B for choosing the decode buffers' head, not a benchmark to quote;
`bench_decode.py` measures whole decodes.

    python scripts/ab_decode_head.py --batch 1 --tokens 512
"""

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deltamem_jax import decoding
from deltamem_jax.cli import load_backbone
from deltamem_jax.forward import jit_for_backend
from models.decoder import KVCache, split_layers


def best_of(f, *args, n=20) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=512, help="prompt length before the decode")
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    b, t, steps = args.batch, args.tokens, 16
    model, _ = load_backbone()
    cfg = model.cfg
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; b={b}, {t}-token prompt")

    embed = model.embed[...]
    x = jnp.ones((b, cfg.hidden_size), jnp.float32)
    alone = {
        "embed [v,d]": best_of(jit_for_backend(lambda x, e: jnp.einsum("bd,vd->bv", x, e)), x, embed),
        "head [d,v]": best_of(jit_for_backend(lambda x, w: jnp.einsum("bd,dv->bv", x, w)), x, jnp.transpose(embed)),
    }
    print("the head alone: " + ", ".join(f"{n} {1e3 * s:.2f} ms ({embed.nbytes / s / 1e9:.1f} GB/s)" for n, s in alone.items()), flush=True)

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    state0 = decoding.prefill(model, tokens, positions, jnp.ones((b, t), bool), KVCache.create(cfg, b, t + steps), None)
    with_head = split_layers(model)
    buffers = {"embed [v,d]": with_head.replace(head=None), "head [d,v]": with_head}
    times, out = {n: [] for n in buffers}, {}
    library_buffers = decoding.layer_buffers
    try:
        for r in range(args.rounds + 1):  # the first round compiles
            for n, buf in buffers.items():
                decoding.layer_buffers = lambda m, buf=buf: buf
                state = jax.tree.map(jnp.copy, state0)
                t0 = time.perf_counter()
                out[n] = np.asarray(jax.block_until_ready(decoding.decode(model, state, steps)[1]))
                if r:
                    times[n].append((time.perf_counter() - t0) / steps)
    finally:
        decoding.layer_buffers = library_buffers
    if not (out["embed [v,d]"] == out["head [d,v]"]).all():
        raise SystemExit("the two heads decoded different tokens")
    line = ", ".join(f"{n} best {1e3 * min(ts):.2f} ms median {1e3 * float(np.median(ts)):.2f} ms" for n, ts in times.items())
    print(f"decode step: {line}; embed ÷ head (best) {min(times['embed [v,d]']) / min(times['head [d,v]']):.3f}×, "
          f"(median) {np.median(times['embed [v,d]']) / np.median(times['head [d,v]']):.3f}×")


if __name__ == "__main__":
    main()
