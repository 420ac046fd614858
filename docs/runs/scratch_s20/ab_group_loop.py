"""Decode attention's per-query-head loop as a `lax.map` (one body in the HLO) against the
unrolled Python loop of `models.decoder._step_attention`: compile time and decode speed.

python docs/runs/scratch_s20/ab_group_loop.py B T [rounds] [none|tsw|msw]   (scratch, not maintained)
Both variants are compiled ahead of time into one process and timed in interleaved rounds.
"""
import statistics, sys, time
import jax, jax.numpy as jnp
import numpy as np
from flax import nnx
import models.decoder as dec
from deltamem_jax.decoding import left_pad, prefill, layer_buffers, _decode_jitted, MAX_STOP_IDS, Sampling, WriteMode
from deltamem_jax.forward import placed_shardings
from models.loading import load_gguf

sys.path.insert(0, "docs/runs/scratch_s20")
from ab_group_loop_impl import looped, unrolled  # noqa: E402


b, t = (int(a) for a in sys.argv[1:3])
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 8
memory_kind = sys.argv[4] if len(sys.argv) > 4 else "none"  # none | tsw | msw
model, cfg, _ = load_gguf(dtype="float32")
memory = None
if memory_kind != "none":
    from deltamem_jax.adapter import attach
    from deltamem_jax.config import DeltaMemConfig
    from deltamem_jax.state import MemoryState
    dm = DeltaMemConfig(num_state_heads=4 if memory_kind == "msw" else 1)
    attach(model, dm)
    memory = MemoryState.zeros(cfg.num_layers, b, dm)
ids = np.random.default_rng(0).integers(100, cfg.vocab_size, (b, t)).tolist()
tokens, positions, valid = left_pad(ids, t)
state0 = prefill(model, tokens, positions, valid, dec.KVCache.create(cfg, b, t + 16), memory)
state0 = state0.replace(cache=state0.cache.replace(prefix=None).unstack())
buffers = layer_buffers(model)
g, p = nnx.split(model)
stop = jnp.full((MAX_STOP_IDS,), -1, jnp.int32)
compiled = {}
for name, fn in (("unrolled", unrolled), ("lax.map", looped)):
    dec._step_attention = fn
    jax.clear_caches()
    t0 = time.perf_counter()
    compiled[name] = _decode_jitted().lower(g, p, buffers, state0, None, stop, 16, Sampling(), WriteMode.TOKENS,
                                            placed_shardings(state0)).compile()
    print(f"{name}: compile {time.perf_counter() - t0:.2f}s", flush=True)
dec._step_attention = unrolled  # the library's again


def run(name):
    state = jax.tree.map(lambda a: a.copy(), state0)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    out = compiled[name](p, buffers, state, None, stop)
    jax.block_until_ready(out)
    return time.perf_counter() - t0, out[1]


toks = {n: run(n)[1] for n in compiled}
assert np.array_equal(np.asarray(toks["unrolled"]), np.asarray(toks["lax.map"])), "the two decodes differ"
times = {n: [] for n in compiled}
for r in range(rounds):
    for n in (list(compiled) if r % 2 == 0 else list(compiled)[::-1]):
        times[n].append(run(n)[0] / 16 * 1e3)
for n, ts in times.items():
    print(f"b={b} t={t} {n:9s} ms/step best {min(ts):.2f} median {statistics.median(ts):.2f}")
a, m = times["unrolled"], times["lax.map"]
print(f"lax.map ÷ unrolled: best {min(m) / min(a):.3f} median {statistics.median(m) / statistics.median(a):.3f}; "
      f"lax.map slower in {sum(x > y for x, y in zip(m, a))}/{rounds} rounds")
