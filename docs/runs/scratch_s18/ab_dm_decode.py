"""δ-mem decode vs plain, interleaved, many rounds (b=1, 512 slots)."""
import sys, time
sys.path.insert(0, ".")
import jax, jax.numpy as jnp, numpy as np
from deltamem_jax.adapter import attach
from deltamem_jax.cli import load_backbone
from deltamem_jax.config import DeltaMemConfig
from deltamem_jax.decoding import decode, prefill
from deltamem_jax.state import MemoryState
from models.decoder import KVCache
b, t, steps, rounds = 1, 512, 16, int(sys.argv[1]) if len(sys.argv) > 1 else 12
models_ = {}
for name in ("plain", "tsw", "msw"):
    m, _ = load_backbone()
    if name != "plain":
        attach(m, DeltaMemConfig(num_state_heads=4 if name == "msw" else 1))
    models_[name] = m
cfg = models_["plain"].cfg
tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t)), jnp.int32)
pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
st0 = {}
for n, m in models_.items():
    mem = None if n == "plain" else MemoryState.zeros(cfg.num_layers, b, m.layers.attn.memory.config)
    st0[n] = jax.block_until_ready(prefill(m, tokens, pos, jnp.ones((b, t), bool), KVCache.create(cfg, b, t + steps), mem))
times = {n: [] for n in models_}
for r in range(rounds + 1):
    for n, m in models_.items():
        st = jax.tree.map(jnp.copy, st0[n])
        t0 = time.perf_counter(); jax.block_until_ready(decode(m, st, steps)[1]); dt = (time.perf_counter() - t0) / steps
        if r: times[n].append(dt)
for n in models_:
    print(f"{n}: best {min(times[n])*1e3:.2f} ms median {np.median(times[n])*1e3:.2f} ms; plain/this best {min(times['plain'])/min(times[n]):.3f} median {np.median(times['plain'])/np.median(times[n]):.3f}")
