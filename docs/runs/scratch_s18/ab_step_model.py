"""Whole-model decode step time with the library's step attention or the grouped form (env STEP=grouped)."""
import os, sys, time
sys.path.insert(0, ".")
import jax, jax.numpy as jnp, numpy as np
import models.decoder as dec
if os.environ.get("STEP") == "grouped":
    sys.path.insert(0, "scripts")
    from ab_cache_layout import grouped
    def step(qg, k, v, valid, cache):
        ck, cv, cvalid, prefix = cache
        assert prefix is None
        return grouped(qg, k, v, valid, (ck, cv, cvalid)).astype(qg.dtype)
    dec._step_attention = step
from deltamem_jax.cli import load_backbone
from deltamem_jax.decoding import decode, prefill
from models.decoder import KVCache
model, _ = load_backbone(); cfg = model.cfg
res = []
for b, t in ((8, 512), (1, 512), (1, 2048)):
    steps = 16
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    st0 = jax.block_until_ready(prefill(model, tokens, pos, jnp.ones((b, t), bool), KVCache.create(cfg, b, t + steps), None))
    ts = []
    for r in range(6):
        st = jax.tree.map(jnp.copy, st0)
        t0 = time.perf_counter(); jax.block_until_ready(decode(model, st, steps)[1]); ts.append((time.perf_counter() - t0) / steps)
    res.append(f"b{b}/{t} {min(ts[1:])*1e3:.2f}")
print(os.environ.get("STEP", "per head"), " ".join(res), flush=True)
