"""Decode compiles for three variants one after another vs in three threads (b=1, 512 tokens)."""
import os, sys, time, threading, concurrent.futures as cf
sys.path.insert(0, "scripts")
import jax, jax.numpy as jnp
from deltamem_jax.decoding import prefill, decode, left_pad
from models.loading import load_gguf
from models.decoder import KVCache
from deltamem_jax.state import MemoryState
from bench_decode import build_variants
model, cfg, _ = load_gguf()
variants = build_variants(model)
mode = sys.argv[1]
def warm(name, b, t):
    m, c = variants[name]
    toks, pos, valid = left_pad([[5] * t] * b, t)
    mem = None if c is None else MemoryState.zeros(cfg.num_layers, b, c)
    st = jax.block_until_ready(prefill(m, toks, pos, valid, KVCache.create(cfg, b, t + 16), mem))
    jax.block_until_ready(decode(m, st, 16)[1])
for b, t in ((1, 512), (8, 512)):
    c0, w0 = os.times(), time.perf_counter()
    if mode == "serial":
        for n in variants: warm(n, b, t)
    else:
        with cf.ThreadPoolExecutor(len(variants)) as ex: list(ex.map(lambda n: warm(n, b, t), variants))
    c1, w1 = os.times(), time.perf_counter()
    print(f"{mode} b{b}/{t}: wall {w1 - w0:.1f} s, cpu {c1.user + c1.system - c0.user - c0.system:.1f} s", flush=True)
