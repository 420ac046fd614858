"""The memory state (a pure pytree) and the per-call write control."""

from __future__ import annotations

import enum

import jax.numpy as jnp
from flax import struct

from deltamem_jax.array_typing import Array, Bool, Float, Int
from deltamem_jax.config import DeltaMemConfig


class WriteMode(str, enum.Enum):
    TOKENS = "tokens"  # every valid token reads S_{t-1}, then writes (TSW, MSW)
    MESSAGES = "messages"  # one write per message from its tokens' mean; all read S_0 (SSW)
    READ_ONLY = "read_only"  # every token reads the same state; nothing is written


@struct.dataclass
class MemoryState:
    """Every layer's memory, float32 `[layers, batch, sub_states, r, r]` (rows = values)."""

    S: Float[Array, "l b m r r"]
    # Training only (None when serving): per layer and row, the sum of the mean write gate
    # β over written tokens and their count, for the official β regularizer.
    gate_stats: Float[Array, "l b 2"] | None = None

    @classmethod
    def zeros(cls, num_layers: int, batch: int, config: DeltaMemConfig, gate_stats: bool = False) -> MemoryState:
        r = config.rank
        stats = jnp.zeros((num_layers, batch, 2), jnp.float32) if gate_stats else None
        return cls(S=jnp.zeros((num_layers, batch, config.num_state_heads, r, r), jnp.float32), gate_stats=stats)

    @property
    def batch(self) -> int:
        return self.S.shape[1]

    def reset(self, rows: Bool[Array, "b"] | None = None) -> MemoryState:
        """Zeros the memory of every batch row, or of the rows where `rows` is True."""
        if rows is None:
            return self.replace(S=jnp.zeros_like(self.S))
        return self.replace(S=jnp.where(rows[None, :, None, None, None], 0.0, self.S))


@struct.dataclass
class WriteControl:
    """How one forward call uses the memory. `mode` is static (part of the compiled shape)."""

    mode: WriteMode = struct.field(pytree_node=False, default=WriteMode.TOKENS)
    message_slots: Int[Array, "b t"] | None = None  # MESSAGES: write slot per token, −1 = none

    @classmethod
    def messages(cls, message_ids: Int[Array, "b t"], valid: Bool[Array, "b t"]) -> WriteControl:
        return cls(mode=WriteMode.MESSAGES, message_slots=message_slots(message_ids, valid))


def message_slots(message_ids: Int[Array, "b t"], valid: Bool[Array, "b t"]) -> Int[Array, "b t"]:
    """Ranks message ids within each row: the k-th smallest active id writes k-th.

    Active tokens have id ≥ 0 and are valid; the rest get −1 (they read, never write).
    Ids may be any non-negative integers (e.g. a session's global message counter).
    """
    active = (message_ids >= 0) & valid  # [b, t]
    ids = jnp.where(active, message_ids, -1)
    same = ids[:, :, None] == ids[:, None, :]  # [b, t, t']
    earlier = jnp.tril(jnp.ones(same.shape[1:], bool), k=-1)  # t' < t
    first = active & ~jnp.any(same & earlier & active[:, None, :], axis=-1)  # first token of its id
    smaller = ids[:, None, :] < ids[:, :, None]  # id_{t'} < id_t
    rank = jnp.sum(smaller & first[:, None, :], axis=-1)
    return jnp.where(active, rank, -1).astype(jnp.int32)
