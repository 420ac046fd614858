"""Logical axis names on every parameter, mapped to mesh axes by one small rules table.

Parameters carry `logical_axes` metadata (e.g. `("embed", "heads", "head_dim")`); the same
model runs on one device (no mesh) or on a mesh, where `shard_state` places each array.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis → mesh axis (None = replicated). One mesh axis per array at most once."""

    batch: str | None = "data"
    vocab: str | None = "model"
    heads: str | None = "model"
    kv_heads: str | None = "model"
    mlp: str | None = "model"
    embed: str | None = None
    head_dim: str | None = None
    layers: str | None = None
    memory: str | None = None  # the r×r memory and its projections stay whole

    def spec(self, logical_axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
        """The PartitionSpec for one array; an axis that doesn't divide evenly stays replicated."""
        out, used = [], set()
        for name, size in zip(logical_axes, shape):
            axis = getattr(self, name) if name is not None else None
            if axis is not None and (axis in used or size % mesh.shape[axis]):
                axis = None
            if axis is not None:
                used.add(axis)
            out.append(axis)
        return PartitionSpec(*out)


def make_mesh(data: int, model: int, devices=None) -> Mesh:
    """A (data × model) mesh over the first data·model devices."""
    devices = jax.devices() if devices is None else devices
    if len(devices) < data * model:
        raise ValueError(f"mesh {data}×{model} needs {data * model} devices, have {len(devices)}")
    return Mesh(np.asarray(devices[: data * model]).reshape(data, model), ("data", "model"))


def state_shardings(state: nnx.State, mesh: Mesh, rules: ShardingRules = ShardingRules()):
    """A pytree of NamedShardings matching `state` (from each Variable's `logical_axes`)."""

    def one(var):
        axes = var.get_metadata().get("logical_axes") or (None,) * var.value.ndim
        return NamedSharding(mesh, rules.spec(axes, var.value.shape, mesh))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: ShardingRules = ShardingRules()) -> None:
    """Moves every array of `model` onto `mesh` as its logical axes and `rules` say."""
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, rules)
    values = jax.tree.map(lambda v: v.value, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    placed = jax.device_put(values, jax.tree.map(lambda s: s, shardings, is_leaf=lambda x: isinstance(x, NamedSharding)))
    nnx.update(model, placed)
