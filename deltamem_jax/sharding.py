"""The memory state and batches on a mesh, and batches spread over processes.

Completes `models.sharding` (parameters, KV cache) with what δ-mem adds. The memory state
`S [l, b, m, r, r]` is split on batch with its r×r blocks whole: one sequence's memory is
a few dozen numbers, and splitting it would only add collectives to every token's
read-then-write. The memory parameters carry logical axes like the layer they correct
(`delta_q`: heads, as `q_proj`), so the same rules place them with that layer.

Across processes (`jax.distributed`) every process builds only the batch rows its devices
hold (`process_rows`, `from_process_rows`) and reads results back with `gather`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from deltamem_jax.state import MemoryState
from models.sharding import ShardingRules, gather, put


def memory_shardings(memory: MemoryState, mesh: Mesh, rules: ShardingRules = ShardingRules()) -> MemoryState:
    """Batch on `rules.batch`; layers and the r×r block as the rules say (whole by default)."""
    stats = memory.gate_stats
    return MemoryState(
        S=rules.sharding(("layers", "batch", "memory", None, None), memory.S.shape, mesh),  # [l, b, m, r, r]
        gate_stats=None if stats is None else rules.sharding(("layers", "batch", None), stats.shape, mesh),  # [l, b, 2]
    )


def place(tree, shardings):
    """Every leaf of `tree` (the same value on every process) put where `shardings` says."""
    return jax.tree.map(put, tree, shardings)


def created(make: Callable[[], Any], shardings: Callable[[Any], Any]):
    """`make()` (e.g. an empty KV cache or memory state) computed straight into the
    shardings that `shardings(abstract result)` gives: never whole on one device."""
    return jax.jit(make, out_shardings=shardings(jax.eval_shape(make)))()


def process_rows(rows: int, mesh: Mesh, rules: ShardingRules = ShardingRules()) -> range:
    """The rows of a `rows`-row batch that this process's devices hold (all of them when
    the batch is replicated, e.g. on a model-only mesh)."""
    index = rules.sharding(("batch",), (rows,), mesh).addressable_devices_indices_map((rows,))
    held = sorted({i for (s,) in index.values() for i in range(*s.indices(rows))})
    if held != list(range(held[0], held[-1] + 1)):
        raise ValueError(f"this process holds rows {held} of the batch: not one contiguous block; order the mesh's devices by process")
    return range(held[0], held[-1] + 1)


def from_process_rows(local, rows: int, mesh: Mesh, rules: ShardingRules = ShardingRules()):
    """One global batch (`rows` rows, split on `rules.batch`) from each process's own rows:
    `local` holds exactly `process_rows(rows, mesh)` of it, in order, as NumPy arrays."""

    def one(x):
        x = np.asarray(x)
        shape = (rows, *x.shape[1:])
        sharding = rules.sharding(("batch",) + (None,) * (x.ndim - 1), shape, mesh)
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(one, local)


__all__ = ["created", "from_process_rows", "gather", "memory_shardings", "place", "process_rows"]
