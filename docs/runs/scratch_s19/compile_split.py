"""Where decode's first call goes: trace, lowering, XLA compile (b=1, 512-token prompt, plain)."""
import time, collections, jax, jax.monitoring, jax.numpy as jnp
from deltamem_jax.decoding import prefill, decode, left_pad
from models.loading import load_gguf
from models.decoder import KVCache
sums = collections.defaultdict(float)
jax.monitoring.register_event_duration_secs_listener(lambda e, d, **k: sums.__setitem__(e, sums[e] + d))
model, cfg, _ = load_gguf()
toks, pos, valid = left_pad([[5] * 512], 512)
st = prefill(model, toks, pos, valid, KVCache.create(cfg, 1, 528), None)
jax.block_until_ready(st); sums.clear()
t0 = time.perf_counter(); s2, out, _ = decode(model, st, 16); jax.block_until_ready(out)
print(f"first decode call {time.perf_counter() - t0:.2f} s")
for e, d in sorted(sums.items(), key=lambda x: -x[1])[:8]: print(f"{d:7.2f} s  {e}")
