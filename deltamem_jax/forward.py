"""One jit-compiled forward call over a model given as (graphdef, params) pytrees."""

from __future__ import annotations

import functools

import jax
from flax import nnx

from deltamem_jax.state import MemoryState, WriteControl
from models.decoder import Decoder, KVCache


@functools.partial(jax.jit, static_argnames=("graphdef", "attend_cache", "last_only"))
def _forward(graphdef, params, tokens, positions, valid, cache, memory, control, attend_cache, last_only):
    model = nnx.merge(graphdef, params)
    return model(tokens, positions, valid, cache, memory, control, attend_cache=attend_cache, last_only=last_only)


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
    return _forward(graphdef, params, tokens, positions, valid, cache, memory, control or WriteControl(), attend_cache, last_only)
