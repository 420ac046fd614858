"""Whole-model decode A/B over decode-buffer variants, interleaved rounds."""
import sys, time
sys.path.insert(0, ".")
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
import models.decoder as dec
from deltamem_jax import decoding
from deltamem_jax.cli import load_backbone
from deltamem_jax.decoding import decode, prefill
from models.decoder import KVCache, LayerBuffers

def buffers(model, parts, fuse_mlp):
    graphdef, state = nnx.split(model.layers)
    states = []
    for i in range(model.cfg.num_layers):
        layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
        layer.attn.fuse_for_decode(parts=parts)
        if fuse_mlp:
            layer.mlp.fuse_for_decode(parts)
        g, st = nnx.split(layer)
        states.append(st)
    return LayerBuffers(graphdef=g, states=tuple(states))

b, t, steps = int(sys.argv[1]), int(sys.argv[2]), 16
variants = sys.argv[3].split(",")  # e.g. 1n,1f,2f
model, _ = load_backbone()
cfg = model.cfg
tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t)), jnp.int32)
positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
state0 = jax.block_until_ready(prefill(model, tokens, positions, jnp.ones((b, t), bool), KVCache.create(cfg, b, t + steps), None))
bufs = {v: buffers(model, int(v[0]), v[1] == "f") for v in variants}
res = {v: [] for v in variants}
for rnd in range(5):
    for v in variants:
        decoding.layer_buffers = lambda m, v=v: bufs[v]
        st = jax.tree.map(jnp.copy, state0)
        t0 = time.perf_counter(); jax.block_until_ready(decode(model, st, steps)[1]); dt = (time.perf_counter() - t0) / steps
        res[v].append(dt)
for v in variants:
    print(f"b={b} t={t} {v}: best {min(res[v][1:])*1e3:.2f} ms/step, median {np.median(res[v][1:])*1e3:.2f}, all {[round(x*1e3,1) for x in res[v]]}")
