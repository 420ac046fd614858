"""Whole-model decode step (ms, best of 5) and prefill (s) in this process; run with and without GLIBC_TUNABLES=glibc.malloc.hugetlb=1."""
import os, re, sys, time
sys.path.insert(0, ".")
import jax, jax.numpy as jnp, numpy as np
from deltamem_jax.cli import load_backbone
from deltamem_jax.decoding import decode, prefill
from models.decoder import KVCache
model, _ = load_backbone(); cfg = model.cfg
res = []
for b, t in ((8, 512), (1, 512), (1, 2048)):
    steps = 16
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    run = lambda: jax.block_until_ready(prefill(model, tokens, pos, jnp.ones((b, t), bool), KVCache.create(cfg, b, t + steps), None))
    st0 = run()
    t0 = time.perf_counter(); run(); pf = time.perf_counter() - t0
    ts = []
    for r in range(6):
        st = jax.tree.map(jnp.copy, st0)
        t0 = time.perf_counter(); jax.block_until_ready(decode(model, st, steps)[1]); ts.append((time.perf_counter() - t0) / steps)
    res.append(f"b{b}/{t} step {min(ts[1:])*1e3:.2f} ms prefill {pf:.2f} s")
hp = re.search(r"AnonHugePages:\s+(\d+)", open("/proc/self/smaps_rollup").read()).group(1)
print("THP" if os.environ.get("GLIBC_TUNABLES") else "4K ", " | ".join(res), f"| huge {int(hp)//1024} MiB", flush=True)
