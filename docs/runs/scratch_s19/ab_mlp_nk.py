"""Whole-model decode step with the MLP's decode-buffer weights stored [out, in] (env NK=1,
computed as W @ xᵀ) or as today [in, out]; one process per form, run alternately."""
import os, sys, time
sys.path.insert(0, ".")
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
import models.decoder as dec
import deltamem_jax.decoding as decoding
NK = os.environ.get("NK") == "1"
if NK:
    orig_call = dec.MLP.__call__
    def call(self, x):
        if not hasattr(self, "gate_t"):
            return orig_call(self, x)
        g = jnp.einsum("fd,btd->btf", self.gate_t[...], x)
        u = jnp.einsum("fd,btd->btf", self.up_t[...], x)
        return jnp.einsum("df,btf->btd", self.down_t[...], jax.nn.silu(g) * u)
    dec.MLP.__call__ = call
    def split_layers(model):
        graphdef, state = nnx.split(model.layers)
        layer_graph, states = None, []
        for i in range(model.cfg.num_layers):
            layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
            layer.attn.fuse_for_decode()
            m = layer.mlp
            m.gate_t, m.up_t, m.down_t = (nnx.Param(jnp.asarray(np.ascontiguousarray(np.asarray(w[...]).T))) for w in (m.gate_proj, m.up_proj, m.down_proj))
            del m.gate_proj, m.up_proj, m.down_proj
            layer_graph, layer_state = nnx.split(layer)
            states.append(layer_state)
        head = jnp.transpose(model.embed[...]) if model.cfg.tie_word_embeddings else None
        return dec.LayerBuffers(graphdef=layer_graph, states=tuple(states), head=head)
    decoding.split_layers = split_layers
from deltamem_jax.cli import load_backbone
from models.decoder import KVCache
model, _ = load_backbone(); cfg = model.cfg
res = []
for b, t in ((1, 512), (8, 512), (1, 2048)):
    steps = 16
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    st0 = jax.block_until_ready(decoding.prefill(model, tokens, pos, jnp.ones((b, t), bool), KVCache.create(cfg, b, t + steps), None))
    ts = []
    for r in range(7):
        st = jax.tree.map(jnp.copy, st0)
        t0 = time.perf_counter(); out = decoding.decode(model, st, steps); jax.block_until_ready(out[1]); ts.append((time.perf_counter() - t0) / steps)
    res.append(f"b{b}/{t} {min(ts[1:])*1e3:.2f} (med {np.median(ts[1:])*1e3:.2f})")
    if b == 1 and t == 512: first = np.asarray(out[1])
print("[n,k]" if NK else "[k,n]", " ".join(res), "tokens", first.ravel()[:6], flush=True)
