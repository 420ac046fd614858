"""Where δ-mem's extra prefill time goes at b=8 × 512 (the bench's worst δ/plain prefill cell).

python docs/runs/scratch_s20/prefill_parts.py B T   (scratch, not maintained)
Interleaved rounds of prefill for: plain; tsw (writer scan, the CPU default); tsw writing
nothing (READ_ONLY: features, reads and corrections, no scan); tsw with the chunked writer.
"""
import dataclasses, statistics, sys, time
import jax
from flax import nnx
from deltamem_jax.adapter import attach
from deltamem_jax.config import DeltaMemConfig
from deltamem_jax.decoding import left_pad
from deltamem_jax.state import MemoryState, WriteControl, WriteMode
from deltamem_jax.forward import forward
from models.decoder import KVCache
from models.loading import load_gguf

b, t = (int(a) for a in sys.argv[1:3]) if len(sys.argv) > 2 else (8, 512)
model, cfg, _ = load_gguf(dtype="float32")
rng = __import__("numpy").random.default_rng(0)
ids = rng.integers(100, cfg.vocab_size, (b, t)).tolist()
tokens, positions, valid = left_pad(ids, t)
cache = KVCache.create(cfg, b, t + 16)
variants = {"plain": (model, None, None)}
for name, dm, mode in (("tsw", DeltaMemConfig(), None), ("tsw_readonly", DeltaMemConfig(), WriteMode.READ_ONLY),
                       ("tsw_chunked", DeltaMemConfig(writer="chunked"), None)):
    m = nnx.merge(*nnx.split(model))
    attach(m, dm)
    variants[name] = (m, MemoryState.zeros(cfg.num_layers, b, dm), mode)


def run(name):
    m, mem, mode = variants[name]  # one forward = the bench's prefill for t <= 1024 (one segment)
    return forward(m, tokens, positions, valid, cache, mem, WriteControl(mode or WriteMode.TOKENS), last_only=True)


times = {n: [] for n in variants}
for n in variants:
    jax.block_until_ready(run(n))  # compile
for r in range(4):
    for n in variants:
        t0 = time.perf_counter()
        jax.block_until_ready(run(n))
        times[n].append(time.perf_counter() - t0)
base = min(times["plain"])
for n, ts in times.items():
    print(f"b={b} t={t} {n:14s} best {min(ts):.3f}s median {statistics.median(ts):.3f}s  best÷plain {min(ts) / base:.3f}")
