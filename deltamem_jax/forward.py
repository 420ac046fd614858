"""One jit-compiled forward call over a model given as (graphdef, params) pytrees.

On a mesh, the KV cache and memory state leave the call with the shardings they came in
with (`keep_shardings`), so a prefill followed by a decode loop never reshards them.
"""

from __future__ import annotations

import functools

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


@functools.partial(jax.jit, static_argnames=("graphdef", "attend_cache", "last_only", "shardings"))
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
    logits, cache, memory = _forward(graphdef, params, tokens, positions, valid, cache, prefix, memory, control or WriteControl(), attend_cache,
                                     last_only, shardings)  # fmt: skip
    return logits, cache.replace(prefix=prefix), memory
