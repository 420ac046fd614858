#!/usr/bin/env python
"""Decode with and without XLA CPU's YNNPACK fusions, side by side.

Both variants are compiled in one process (`decoding.CPU_DECODE_OPTIONS` switches the
fusions per jit) and timed in interleaved rounds of 16 decode steps on a per-layer cache
(as a stream's calls after its first find it), so the machine's drift hits both alike.
A scratch A/B for choosing the CPU default, not a benchmark to quote.

    python scripts/ab_ynn_fusions.py
"""
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deltamem_jax import decoding
from deltamem_jax.cli import load_backbone
from deltamem_jax.decoding import prefill
from models.decoder import KVCache

variants = {"ynn": {}, "noynn": {"xla_cpu_experimental_ynn_fusion_type": ""}}
model, _ = load_backbone()
cfg = model.cfg
steps = 16
for b, t in ((1, 512), (8, 512), (1, 2048)):
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = jnp.ones((b, t), bool)
    ready = lambda: jax.block_until_ready(prefill(model, tokens, pos, valid, KVCache.create(cfg, b, t + steps), None))
    times = {k: [] for k in variants}
    for r in range(8):
        for name, options in variants.items():
            decoding.CPU_DECODE_OPTIONS = options
            s = ready()
            s = s.replace(cache=s.cache.unstack())
            t0 = time.perf_counter()
            jax.block_until_ready(decoding.decode(model, s, steps)[1])
            if r:  # round 0 compiles
                times[name].append((time.perf_counter() - t0) / steps)
    print(f"b={b} t={t}: " + ", ".join(f"{k} best {1e3*min(v):.1f} ms median {1e3*float(np.median(v)):.1f} ms" for k, v in times.items()), flush=True)
