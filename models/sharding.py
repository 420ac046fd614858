"""Logical axis names on every array, mapped to mesh axes by one small rules table.

Parameters carry `logical_axes` metadata (e.g. `("embed", "heads", "head_dim")`); the KV
cache and batches get theirs here. The same model runs on one device (no mesh) or on a
`(data, model)` mesh, which may span several processes (`jax.distributed`): there every
process holds only its own shards, so placement goes through `put`, never through one
device holding a whole array.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.decoder import KVCache


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis → mesh axis (None = replicated).

    A mesh axis can split one dimension of an array only: rules that send two logical axes
    of the same array to one mesh axis are refused (`spec` raises), not silently
    replicated, since that would quietly drop the sharding the table asks for. An axis
    whose size the mesh axis does not divide stays replicated (small test shapes, odd
    vocabularies), which is a property of the shape, not of the table.
    """

    batch: str | None = "data"
    vocab: str | None = "model"
    heads: str | None = "model"
    kv_heads: str | None = "model"
    mlp: str | None = "model"
    embed: str | None = None
    head_dim: str | None = None
    layers: str | None = None
    memory: str | None = None  # the r×r memory and its projections stay whole

    def mesh_axis(self, logical: str | None) -> str | None:
        if logical is None:
            return None
        if logical not in {f.name for f in dataclasses.fields(self)}:
            raise ValueError(f"unknown logical axis {logical!r}; ShardingRules knows {[f.name for f in dataclasses.fields(self)]}")
        return getattr(self, logical)

    def spec(self, logical_axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
        """The PartitionSpec of one array; an axis that doesn't divide evenly stays replicated."""
        if len(logical_axes) != len(shape):
            raise ValueError(f"logical axes {logical_axes} do not match shape {shape}")
        axes = [self.mesh_axis(name) for name in logical_axes]
        named = [a for a in axes if a is not None]
        twice = sorted({a for a in named if named.count(a) > 1})
        if twice:
            raise ValueError(
                f"logical axes {logical_axes} put mesh axis {twice[0]!r} on two dimensions of one array; "
                f"map one of them to None (or to another mesh axis) in ShardingRules"
            )
        for a in named:
            if a not in mesh.shape:
                raise ValueError(f"ShardingRules names mesh axis {a!r}, the mesh has {tuple(mesh.shape)}")
        return PartitionSpec(*(a if a is not None and size % mesh.shape[a] == 0 else None for a, size in zip(axes, shape)))

    def sharding(self, logical_axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
        return NamedSharding(mesh, self.spec(logical_axes, shape, mesh))


def make_mesh(data: int, model: int, devices=None) -> Mesh:
    """A (data × model) mesh over the first data·model devices.

    `jax.devices()` lists every process's devices, process by process, so on several
    processes the data axis runs across processes and the model axis within one (its
    collectives stay on a host) whenever `model` divides the devices per process.
    """
    devices = jax.devices() if devices is None else devices
    if len(devices) < data * model:
        raise ValueError(f"mesh {data}×{model} needs {data * model} devices, have {len(devices)}")
    return Mesh(np.asarray(devices[: data * model]).reshape(data, model), ("data", "model"))


def parse_mesh(text: str) -> tuple[int, int]:
    """`"4x2"` → (data 4, model 2); `"auto"` → every device on the data axis."""
    if text == "auto":
        return len(jax.devices()), 1
    try:
        data, model = (int(x) for x in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise ValueError(f"a mesh is DATAxMODEL (e.g. 4x2) or auto, got {text!r}") from None
    return data, model


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh, rules: ShardingRules = ShardingRules()):
    """A pytree of NamedShardings matching `state` (from each Variable's `logical_axes`)."""

    def one(path, var):
        axes = var.get_metadata().get("logical_axes") or (None,) * len(var.get_value().shape)
        try:
            return rules.sharding(axes, var.get_value().shape, mesh)
        except ValueError as e:
            raise ValueError(f"{jax.tree_util.keystr(path)}: {e}") from None

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_var)


def cache_shardings(cache: KVCache, mesh: Mesh, rules: ShardingRules = ShardingRules()) -> KVCache:
    """The KV cache on a mesh: batch on `rules.batch`, KV heads as the attention's weights."""
    return KVCache(
        k=rules.sharding(("layers", "batch", "kv_heads", "head_dim", None), cache.k.shape, mesh),  # [l, b, k, h, s]
        v=rules.sharding(("layers", "batch", "kv_heads", None, "head_dim"), cache.v.shape, mesh),  # [l, b, k, s, h]
        valid=rules.sharding(("batch", None), cache.valid.shape, mesh),  # [b, s]
        end=NamedSharding(mesh, PartitionSpec()),
    )


def batch_shardings(tree, mesh: Mesh, rules: ShardingRules = ShardingRules()):
    """Every leaf of `tree` (arrays or ShapeDtypeStructs) split on its leading batch axis."""
    return jax.tree.map(lambda x: rules.sharding(("batch",) + (None,) * (len(x.shape) - 1), x.shape, mesh), tree)


def put(value, sharding: NamedSharding) -> jax.Array:
    """`value` (the same on every process) placed as `sharding`.

    On one process, or for an array already spread over processes, this is
    `jax.device_put`. A host value (or one process's local array) bound for several
    processes is cut by each process into only the shards its own devices hold
    (`jax.make_array_from_callback`).
    """
    if sharding.is_fully_addressable or (isinstance(value, jax.Array) and not value.is_fully_addressable):
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def gather(tree):
    """Every array's full value as NumPy on every process (an all-gather where a process
    holds only part of it)."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def shard_model(model: nnx.Module, mesh: Mesh, rules: ShardingRules = ShardingRules()) -> None:
    """Moves every array of `model` onto `mesh` as its logical axes and `rules` say (in place)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    placed = jax.tree.map(lambda v, s: put(v.get_value(), s), state, shardings, is_leaf=_is_var)
    nnx.update(model, placed)


def create_sharded(build: Callable[[], nnx.Module], mesh: Mesh, rules: ShardingRules = ShardingRules()) -> nnx.Module:
    """`build()` run as one compiled program whose outputs are the model's arrays, each
    with its rules' sharding: every device computes only its own shards, so no parameter
    is ever whole on one device (the way to initialize a model too big for one).

    `build` must be deterministic (it runs twice: once abstractly for the shapes)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    shardings = state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.state(build()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


__all__ = [
    "ShardingRules",
    "batch_shardings",
    "cache_shardings",
    "create_sharded",
    "gather",
    "make_mesh",
    "parse_mesh",
    "put",
    "shard_model",
    "state_shardings",
]
