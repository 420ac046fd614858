#!/usr/bin/env python
"""Prefill and decode with and without XLA CPU's YNNPACK fusions, side by side.

Both variants are compiled in one process (`forward.CPU_COMPILE_OPTIONS` switches the
fusions per jit) and timed in interleaved rounds: a prefill of the prompt, then 16 decode
steps on a per-layer cache (as a stream's calls after its first find it), so the
machine's drift hits both alike. A scratch A/B for choosing the CPU default, not a
benchmark to quote.

    python scripts/ab_ynn_fusions.py
"""

import importlib
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

forward_module = importlib.import_module("deltamem_jax.forward")  # the package exports a function of that name
variants = {"ynn": {}, "noynn": {"xla_cpu_experimental_ynn_fusion_type": ""}}
model, _ = load_backbone()
cfg = model.cfg
steps = 16
for b, t in ((1, 512), (8, 512), (1, 2048)):
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = jnp.ones((b, t), bool)
    times = {k: {"prefill": [], "decode": []} for k in variants}
    for r in range(6):
        for name, options in variants.items():
            forward_module.CPU_COMPILE_OPTIONS = options
            t0 = time.perf_counter()
            s = jax.block_until_ready(prefill(model, tokens, pos, valid, KVCache.create(cfg, b, t + steps), None))
            t1 = time.perf_counter()
            s = s.replace(cache=s.cache.unstack())
            t2 = time.perf_counter()
            jax.block_until_ready(decoding.decode(model, s, steps)[1])
            if r:  # round 0 compiles
                times[name]["prefill"].append(t1 - t0)
                times[name]["decode"].append((time.perf_counter() - t2) / steps)
    print(f"b={b} t={t}: " + ", ".join(
        f"{k} prefill best {min(v['prefill']):.2f} s median {float(np.median(v['prefill'])):.2f} s, decode best "
        f"{1e3 * min(v['decode']):.1f} ms median {1e3 * float(np.median(v['decode'])):.1f} ms" for k, v in times.items()), flush=True)
