"""Training on a mesh: `step.py`'s train step with explicit shardings, data-parallel over
the data axis and tensor-parallel over the model axis, on one process or several.

Where everything lives (all from one `ShardingRules` table):
- the frozen backbone by its parameters' logical axes (heads, KV heads, MLP, vocabulary
  split over `model`);
- the memory parameters like the layer they correct, and the optimizer state like the
  parameters it tracks (Adam moments, accumulated gradients); step counters replicated;
- batches split on `data`: each process renders only the episodes of its own rows
  (`process_batch`), so no process ever reads the whole batch.

The step itself is `make_train_step` (same loss, clipping, accumulation), compiled once
with these in/out shardings; XLA inserts the gradient all-reduce over `data`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deltamem_jax.sharding import from_process_rows, process_rows
from deltamem_jax.training.step import make_train_step
from models.sharding import ShardingRules, batch_shardings, state_shardings


@dataclasses.dataclass(frozen=True)
class TrainShardings:
    """Shardings of the train step's arguments and results (pytrees of NamedSharding)."""

    params: Any
    opt_state: Any
    frozen: Any
    batch: Any
    replicated: NamedSharding  # metrics and scalars

    @property
    def mesh(self) -> Mesh:
        return self.replicated.mesh


def train_shardings(tx: optax.GradientTransformation, params, frozen, batch, mesh: Mesh,
                    rules: ShardingRules = ShardingRules()) -> TrainShardings:  # fmt: skip
    """Shardings for `params`/`frozen` (nnx.States), their optimizer state and a global
    `batch` (arrays or ShapeDtypeStructs with the global shapes)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params_sh = state_shardings(params, mesh, rules)
    opt_abstract = jax.eval_shape(tx.init, params)
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, opt_abstract, params_sh,
        transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, (nnx.Variable, NamedSharding)),
    )  # fmt: skip
    return TrainShardings(params_sh, opt_sh, state_shardings(frozen, mesh, rules), batch_shardings(batch, mesh, rules), replicated)


def init_opt_state(tx: optax.GradientTransformation, params, shardings: TrainShardings):
    """The optimizer state created directly in its shardings (never whole on one device)."""
    return jax.jit(tx.init, in_shardings=(shardings.params,), out_shardings=shardings.opt_state)(params)


def make_sharded_train_step(graphdef, tx: optax.GradientTransformation, shardings: TrainShardings, **step_options) -> Callable:
    """`step(params, opt_state, frozen, batch) -> (params, opt_state, metrics)` on the mesh.

    `step_options` go to `make_train_step` (remat, value_weight, …). Arguments are
    resharded to `shardings` on entry if they live elsewhere; results come back in them
    (metrics replicated), so the step never moves its state between calls."""
    s = shardings
    return jax.jit(
        make_train_step(graphdef, tx, **step_options),
        in_shardings=(s.params, s.opt_state, s.frozen, s.batch),
        out_shardings=(s.params, s.opt_state, s.replicated),
        donate_argnums=(0, 1),
    )


def process_batch(make_rows: Callable[[int, int], Any], rows: int, mesh: Mesh, rules: ShardingRules = ShardingRules()):
    """One global batch of `rows` rows, each process building only its own rows.

    `make_rows(start, count)` returns a batch (NumPy pytree) of rows [start, start+count)
    of the global batch, e.g. `renderer.batch(episodes(seed, "train", first + start, count))`.
    """
    mine = process_rows(rows, mesh, rules)
    return from_process_rows(make_rows(mine.start, len(mine)), rows, mesh, rules)


def abstract(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying `shardings`: an orbax restore target that puts
    each array straight onto its shards (any mesh, or one device)."""

    def one(x, sharding):
        if isinstance(x, nnx.Variable):  # keep the Variable (and its metadata) around the value
            return x.replace(jax.ShapeDtypeStruct(x.get_value().shape, x.get_value().dtype, sharding=sharding))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, tree, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


__all__ = ["TrainShardings", "abstract", "init_opt_state", "make_sharded_train_step", "process_batch", "train_shardings"]
