"""Decode attention's per-query-head loop as a `lax.map` (one body in the HLO) against the
unrolled Python loop of `models.decoder._step_attention`: compile time and decode speed.

python docs/runs/scratch_s20/ab_group_loop.py B T [rounds]   (scratch, not maintained)
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

ORIG = dec._step_attention


def looped(qg, k, v, valid, cache):
    b, _, kvh, g, h = qg.shape
    if cache is None:
        return ORIG(qg, k, v, valid, cache)
    q = qg[:, 0]
    ck, cv, cvalid, prefix = cache
    own_k, own_v = k[:, 0].astype(jnp.float32), v[:, 0].astype(jnp.float32)

    def one_head(qi):  # [b,k,h]
        own = jnp.where(valid, jnp.sum(qi.astype(jnp.float32) * own_k, axis=-1), dec._MASKED)
        cs = jnp.einsum("bkh,bkhs->bks", qi, ck, preferred_element_type=jnp.float32)
        cs = jnp.where(cvalid[:, None, :], cs, dec._MASKED)
        m = jnp.maximum(jnp.max(cs, axis=-1), own)
        e, e_own = jnp.exp(cs - m[..., None]), jnp.exp(own - m)
        o = jnp.einsum("bks,bksh->bkh", e.astype(cv.dtype), cv, preferred_element_type=jnp.float32) + e_own[..., None] * own_v
        return m, jnp.sum(e, axis=-1) + e_own, o

    m, l, o = jax.lax.map(one_head, jnp.moveaxis(q, 2, 0))
    assert prefix is None
    return dec._merge([(jnp.moveaxis(m, 0, 2), jnp.moveaxis(l, 0, 2), jnp.moveaxis(o, 0, 2))])[:, None].astype(qg.dtype)


b, t = (int(a) for a in sys.argv[1:3])
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 8
model, cfg, _ = load_gguf(dtype="float32")
ids = np.random.default_rng(0).integers(100, cfg.vocab_size, (b, t)).tolist()
tokens, positions, valid = left_pad(ids, t)
state0 = prefill(model, tokens, positions, valid, dec.KVCache.create(cfg, b, t + 16), None)
state0 = state0.replace(cache=state0.cache.replace(prefix=None).unstack())
buffers = layer_buffers(model)
g, p = nnx.split(model)
stop = jnp.full((MAX_STOP_IDS,), -1, jnp.int32)
compiled = {}
for name, fn in (("unrolled", ORIG), ("lax.map", looped)):
    dec._step_attention = fn
    jax.clear_caches()
    t0 = time.perf_counter()
    compiled[name] = _decode_jitted().lower(g, p, buffers, state0, None, stop, 16, Sampling(), WriteMode.TOKENS,
                                            placed_shardings(state0)).compile()
    print(f"{name}: compile {time.perf_counter() - t0:.2f}s", flush=True)
dec._step_attention = ORIG


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
