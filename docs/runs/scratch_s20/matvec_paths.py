"""x @ W (LM-head shape, W [576, 49152]) for batch 1 and 8, float32 and bfloat16, with
XLA CPU's YNNPACK fusions on (XLA's default) and off (the library's CPU option)
(scratch, not maintained): python docs/runs/scratch_s20/matvec_paths.py"""
import statistics, time
import jax, jax.numpy as jnp

w32 = jax.random.normal(jax.random.key(0), (576, 49152), jnp.float32)
fn = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)
for opts_name, opts in (("ynn on (default)", None), ("ynn off", {"xla_cpu_experimental_ynn_fusion_type": ""})):
    for b in (1, 8):
        for dt in (jnp.float32, jnp.bfloat16):
            w, x = w32.astype(dt), jnp.ones((b, 576), dt)
            f = jax.jit(fn, compiler_options=opts).lower(x, w).compile()
            jax.block_until_ready(f(x, w))
            ts = []
            for _ in range(30):
                t0 = time.perf_counter(); jax.block_until_ready(f(x, w)); ts.append(time.perf_counter() - t0)
            print(f"{opts_name:17s} b={b} {jnp.dtype(dt).name:8s} best {min(ts) * 1e3:6.2f} ms median {statistics.median(ts) * 1e3:6.2f} ms "
                  f"({w.nbytes / min(ts) / 1e9:.1f} GB/s)", flush=True)
