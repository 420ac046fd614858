"""bfloat16 against float32 weights for a jitted x @ W (the LM head's shape), batch 1 and 8,
on this CPU (scratch, not maintained): python docs/runs/scratch_s20/bf16_matvec.py"""
import statistics, time
import jax, jax.numpy as jnp

w32 = jax.random.normal(jax.random.key(0), (576, 49152), jnp.float32)
f = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
for b in (1, 8):
    res = {}
    for dt in (jnp.float32, jnp.bfloat16):
        w, x = w32.astype(dt), jnp.ones((b, 576), dt)
        jax.block_until_ready(f(x, w))
        ts = []
        for _ in range(30):
            t0 = time.perf_counter(); jax.block_until_ready(f(x, w)); ts.append(time.perf_counter() - t0)
        res[jnp.dtype(dt).name] = (min(ts), statistics.median(ts), w.nbytes)
    for n, (best, med, nb) in res.items():
        print(f"b={b} {n:8s} best {best * 1e3:.2f} ms ({nb / best / 1e9:.1f} GB/s) median {med * 1e3:.2f} ms")
    print(f"b={b} bfloat16 ÷ float32 time (best): {res['bfloat16'][0] / res['float32'][0]:.2f}")
