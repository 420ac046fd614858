"""Decode compile seconds with the query heads unrolled against a lax.map, alternating,
each compile after jax.clear_caches() (scratch, not maintained):
python docs/runs/scratch_s20/compile_ab.py [none|tsw] [repeats]"""
import dataclasses, statistics, sys, time
import jax, jax.numpy as jnp
from flax import nnx
import models.decoder as dec
from deltamem_jax.adapter import attach
from deltamem_jax.config import DeltaMemConfig
from deltamem_jax.decoding import left_pad, prefill, layer_buffers, _decode_jitted, MAX_STOP_IDS, Sampling, WriteMode
from deltamem_jax.forward import placed_shardings
from deltamem_jax.state import MemoryState
from models.config import ModelConfig
from models.gguf import read_gguf

sys.path.insert(0, "docs/runs/scratch_s20")
from ab_group_loop_impl import looped, unrolled  # noqa: E402

kind = sys.argv[1] if len(sys.argv) > 1 else "none"
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
cfg = ModelConfig.from_hf(read_gguf(load_tensors=False).config)
m = dec.Decoder(cfg, nnx.Rngs(0))
mem = None
if kind == "tsw":
    attach(m, DeltaMemConfig())
    mem = MemoryState.zeros(cfg.num_layers, 1, DeltaMemConfig())
tokens, positions, valid = left_pad([[5] * 512], 512)
state = prefill(m, tokens, positions, valid, dec.KVCache.create(cfg, 1, 528), mem)
state = state.replace(cache=state.cache.replace(prefix=None).unstack())
buffers, (g, p) = layer_buffers(m), nnx.split(m)
stop = jnp.full((MAX_STOP_IDS,), -1, jnp.int32)
impls = {"unrolled": unrolled, "lax.map": looped}
times = {n: [] for n in impls}
for r in range(reps):
    for n in (list(impls) if r % 2 == 0 else list(impls)[::-1]):
        dec._step_attention = impls[n]
        jax.clear_caches()
        t0 = time.perf_counter()
        _decode_jitted().lower(g, p, buffers, state, None, stop, 16, Sampling(), WriteMode.TOKENS, placed_shardings(state)).compile()
        times[n].append(time.perf_counter() - t0)
for n, ts in times.items():
    print(f"{kind} {n:9s} compile s: {' '.join(f'{x:.2f}' for x in ts)}  median {statistics.median(ts):.2f}")
