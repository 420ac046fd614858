"""Where a decode compile's seconds go (trace / lower / XLA backend) and how big its HLO is.

python docs/runs/scratch_s20/decode_compile.py [layers]   (scratch, not maintained)
"""
import dataclasses, re, sys, time
import jax, jax.numpy as jnp
from flax import nnx
from deltamem_jax.adapter import attach
from deltamem_jax.config import DeltaMemConfig
from deltamem_jax.decoding import left_pad, prefill, layer_buffers, _decode_jitted, MAX_STOP_IDS, Sampling, WriteMode
from deltamem_jax.forward import placed_shardings
from deltamem_jax.state import MemoryState
from models.config import ModelConfig
from models.decoder import Decoder, KVCache
from models.gguf import read_gguf

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 30
cfg = ModelConfig.from_hf(read_gguf(load_tensors=False).config)
cfg = dataclasses.replace(cfg, num_layers=layers, rope_layers=())
base = Decoder(cfg, nnx.Rngs(0))
for name, dm in (("plain", None), ("tsw", DeltaMemConfig()), ("msw", DeltaMemConfig(num_state_heads=4))):
    m = nnx.merge(*nnx.split(base))
    if dm is not None:
        attach(m, dm)
    tokens, positions, valid = left_pad([[5] * 512], 512)
    cache = KVCache.create(cfg, 1, 528)
    mem = None if dm is None else MemoryState.zeros(cfg.num_layers, 1, dm)
    state = prefill(m, tokens, positions, valid, cache, mem)
    buffers = layer_buffers(m)
    state = state.replace(cache=state.cache.replace(prefix=None).unstack())
    g, p = nnx.split(m)
    stop = jnp.full((MAX_STOP_IDS,), -1, jnp.int32)
    t0 = time.perf_counter()
    traced = _decode_jitted().trace(g, p, buffers, state, None, stop, 16, Sampling(), WriteMode.TOKENS, placed_shardings(state))
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    txt = compiled.as_text()
    fusions = len(re.findall(r"^\s*\S+ = \S+ fusion\(", txt, re.M))
    comps = len(re.findall(r"^(?:ENTRY )?%?\S+ .*\{$", txt, re.M))
    print(f"{name} layers={layers}: trace {t1-t0:.2f}s lower {t2-t1:.2f}s compile {t3-t2:.2f}s; "
          f"stablehlo {len(lowered.as_text())//1000} kB, optimized hlo {len(txt)//1000} kB, fusion calls {fusions}, computations {comps}", flush=True)
    if len(sys.argv) > 2:
        import collections
        ops = collections.Counter()
        entry_like = re.findall(r"^\s*(\S+) = (\S+) (\w[\w-]*)\(", txt, re.M)
        # ops in the while body (the step), non-fused
        for _, _, op in entry_like:
            ops[op] += 1
        print(ops.most_common(40))
        open(f"/tmp/decode_{name}.hlo", "w").write(txt)
