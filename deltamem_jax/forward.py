"""One jit-compiled forward call over a model given as (graphdef, params) pytrees.

On a mesh, the KV cache and memory state leave the call with the shardings they came in
with (`keep_shardings`), so a prefill followed by a decode loop never reshards them.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import NamedSharding

from deltamem_jax.state import MemoryState, WriteControl
from models.decoder import Decoder, KVCache


def placed_shardings(tree):
    """The mesh sharding of every leaf of `tree` (None for a leaf not on a mesh): a hashable
    static argument that tells a compiled call where its carried state must stay."""
    return jax.tree.map(lambda x: x.sharding if isinstance(getattr(x, "sharding", None), NamedSharding) else None, tree)


def keep_shardings(tree, shardings):
    """`tree` constrained to `shardings` (from `placed_shardings`; None leaves are left free)."""
    return jax.tree.map(lambda x, s: x if s is None else jax.lax.with_sharding_constraint(x, s), tree, shardings)


# XLA options for the compiled prefill and decode on CPU: without XLA CPU's YNNPACK fusions,
# its dots run on its own emitter. `python scripts/ab_ynn_fusions.py` on the AMD EPYC measured
# decode at batch 8 12–17% faster in three runs (batch 1 within the noise) and prefill up to
# 10% faster (b=8, 512: its attention's fused score and value products), never slower (README § Speed).
CPU_COMPILE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
_JITS: dict = {}


def jit_for_backend(fun, **jit_kwargs):
    """`jax.jit(fun, **jit_kwargs)` with `CPU_COMPILE_OPTIONS` when the default backend is the
    CPU, built once per function and options (each function is always jitted alike)."""
    options = tuple(sorted(CPU_COMPILE_OPTIONS.items())) if jax.default_backend() == "cpu" else ()
    if (fun, options) not in _JITS:
        _JITS[fun, options] = jax.jit(fun, compiler_options=dict(options) or None, **jit_kwargs)
    return _JITS[fun, options]


def _forward_jitted():
    return jit_for_backend(_forward, static_argnames=("graphdef", "attend_cache", "last_only", "shardings"))


def _forward(graphdef, params, tokens, positions, valid, cache, prefix, memory, control, attend_cache, last_only, shardings):
    model = nnx.merge(graphdef, params)
    logits, cache, memory = model(tokens, positions, valid, cache.replace(prefix=prefix), memory, control, attend_cache=attend_cache,
                                  last_only=last_only)  # fmt: skip
    cache, memory = keep_shardings((cache.replace(prefix=None), memory), shardings)
    return logits, cache, memory


def forward(
    model: Decoder,
    tokens: jax.Array,  # [b, t]
    positions: jax.Array,  # [b, t]
    valid: jax.Array,  # [b, t] bool
    cache: KVCache,
    memory: MemoryState | None = None,
    control: WriteControl | None = None,
    *,
    attend_cache: bool = True,
    last_only: bool = False,
) -> tuple[jax.Array, KVCache, MemoryState | None]:
    """Logits `[b, t, v]`, the extended KV cache and the new memory state.

    `memory=None` runs the frozen backbone even when δ-mem is attached.
    """
    graphdef, params = nnx.split(model)
    # a cache a CPU decode left per layer (`decoding.decode`) is stacked again: one copy per turn
    prefix, cache = cache.prefix, cache.replace(prefix=None).stack()  # a shared prefix is read, never returned (no copy of it)
    shardings = placed_shardings((cache, memory))
    logits, cache, memory = _forward_jitted()(graphdef, params, tokens, positions, valid, cache, prefix, memory, control or WriteControl(), attend_cache,
                                     last_only, shardings)  # fmt: skip
    return logits, cache.replace(prefix=prefix), memory
