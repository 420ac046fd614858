import sys, time
sys.path.insert(0, ".")
import jax, jax.numpy as jnp, numpy as np
from deltamem_jax.cli import load_backbone
from deltamem_jax.decoding import prefill
from models.decoder import KVCache
t = int(sys.argv[1]); segs = [int(s) for s in sys.argv[2].split(",")]; rounds = int(sys.argv[3])
model, _ = load_backbone(); cfg = model.cfg
tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, t)), jnp.int32)
pos = jnp.arange(t, dtype=jnp.int32)[None]; valid = jnp.ones((1, t), bool)
res = {s: [] for s in segs}; last = {}
for r in range(rounds + 1):
    for s in segs:
        t0 = time.perf_counter()
        st = jax.block_until_ready(prefill(model, tokens, pos, valid, KVCache.create(cfg, 1, t + 16), None, segment=s))
        if r: res[s].append(time.perf_counter() - t0)
        last[s] = np.asarray(st.logits)
for s in segs:
    print(f"t={t} segment={s}: best {min(res[s]):.3f} s, all {[round(x, 3) for x in res[s]]}, max|Δlogits| vs first {np.abs(last[s]-last[segs[0]]).max():.2e}", flush=True)
