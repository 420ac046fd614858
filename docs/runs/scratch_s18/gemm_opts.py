import time, sys, jax, jax.numpy as jnp, numpy as np
t, d, f = 2048, 576, 1536
x = jnp.asarray(np.random.default_rng(0).standard_normal((t, d), np.float32))
w = jnp.asarray(np.random.default_rng(1).standard_normal((d, f), np.float32))
w2 = jnp.asarray(np.random.default_rng(2).standard_normal((f, d), np.float32))
opts = {"default": None, "ynn_off": {"xla_cpu_experimental_ynn_fusion_type": ""}}
for name, o in opts.items():
    fn = jax.jit(lambda x, w, w2: (x @ w) @ w2, compiler_options=o)
    jax.block_until_ready(fn(x, w, w2)); ts = []
    for _ in range(10):
        t0 = time.perf_counter(); jax.block_until_ready(fn(x, w, w2)); ts.append(time.perf_counter() - t0)
    print(f"{name}: {min(ts)*1e3:.2f} ms, {2*2*t*d*f/min(ts)/1e9:.1f} GFLOPS", flush=True)
import torch
torch.set_num_threads(2)
xt, wt, w2t = torch.tensor(np.asarray(x)), torch.tensor(np.asarray(w)), torch.tensor(np.asarray(w2))
ts = []
for _ in range(10):
    t0 = time.perf_counter(); (xt @ wt) @ w2t; ts.append(time.perf_counter() - t0)
print(f"torch: {min(ts)*1e3:.2f} ms, {2*2*t*d*f/min(ts)/1e9:.1f} GFLOPS")
