"""Two identical plain models (the same weights, copied into new arrays) decoded in one
process, interleaved for 10 rounds: how far apart two copies of the same program run."""
import sys, time
sys.path.insert(0, ".")
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from deltamem_jax.cli import load_backbone
from deltamem_jax.decoding import decode, prefill
from models.decoder import KVCache
a, _ = load_backbone(); cfg = a.cfg
g, s = nnx.split(a)
b_model = nnx.merge(g, jax.tree.map(lambda x: jnp.array(x, copy=True), s))
for b, t in ((1, 512), (8, 512)):
    steps = 16
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    st0 = {n: jax.block_until_ready(prefill(m, tokens, pos, jnp.ones((b, t), bool), KVCache.create(cfg, b, t + steps), None)) for n, m in (("A", a), ("B", b_model))}
    ts = {"A": [], "B": []}
    for r in range(11):
        for n, m in ((("A", a), ("B", b_model)) if r % 2 else (("B", b_model), ("A", a))):
            st = jax.tree.map(jnp.copy, st0[n])
            t0 = time.perf_counter(); jax.block_until_ready(decode(m, st, steps)[1]); ts[n].append((time.perf_counter() - t0) / steps * 1e3)
    A, B = np.array(ts["A"][1:]), np.array(ts["B"][1:])
    print(f"b{b}/{t}: A best {A.min():.2f} med {np.median(A):.2f} | B best {B.min():.2f} med {np.median(B):.2f} | B/A best {B.min()/A.min():.3f} med {np.median(B)/np.median(A):.3f} | B slower in {int((B > A).sum())}/10 paired rounds", flush=True)
