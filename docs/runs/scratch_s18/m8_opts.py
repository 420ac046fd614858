"""30 layers of [b,576]@[576,1536] + [b,1536]@[1536,576] chains, weights as args, per option set."""
import time, sys, os, jax, jax.numpy as jnp, numpy as np
L, d, f = 30, 576, 1536
rng = np.random.default_rng(0)
W1 = [jnp.asarray(rng.standard_normal((d, f), np.float32) * .02) for _ in range(L)]
W2 = [jnp.asarray(rng.standard_normal((f, d), np.float32) * .02) for _ in range(L)]
flops = lambda b: 2 * b * 2 * d * f * L
def body(x, W1, W2):
    for a, c in zip(W1, W2):
        x = x + jnp.tanh(x @ a) @ c
    return x
sets = {"ynn default": None, "ynn off": {"xla_cpu_experimental_ynn_fusion_type": ""},
        "ynn dot only": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
        "xnn dot": {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}}
for b in (8, 1):
    x = jnp.ones((b, d), jnp.float32)
    for name, o in sets.items():
        try:
            fn = jax.jit(body, compiler_options=o)
            jax.block_until_ready(fn(x, W1, W2)); ts = []
            for _ in range(15):
                t0 = time.perf_counter(); jax.block_until_ready(fn(x, W1, W2)); ts.append(time.perf_counter() - t0)
            print(f"b={b} {name:14s}: {min(ts)*1e3:6.2f} ms  {flops(b)/min(ts)/1e9:6.1f} GFLOPS  {sum(w.nbytes for w in W1+W2)/min(ts)/1e9:5.1f} GB/s", flush=True)
        except Exception as e:
            print(name, "failed", str(e)[:200])
import torch
torch.set_num_threads(2)
T1 = [torch.tensor(np.asarray(w)) for w in W1]; T2 = [torch.tensor(np.asarray(w)) for w in W2]
for b in (8, 1):
    xt = torch.ones(b, d)
    ts = []
    with torch.no_grad():
        for _ in range(15):
            t0 = time.perf_counter(); y = xt
            for a, c in zip(T1, T2): y = y + torch.tanh(y @ a) @ c
            ts.append(time.perf_counter() - t0)
    print(f"b={b} torch: {min(ts)*1e3:6.2f} ms  {flops(b)/min(ts)/1e9:6.1f} GFLOPS")
