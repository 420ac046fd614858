"""δ-mem in JAX/Flax NNX: a tiny online associative memory for frozen decoder LLMs."""

from deltamem_jax import _xla_flags  # noqa: F401  (first: before JAX starts its CPU backend)

from deltamem_jax.adapter import attach, detach, load_adapter, memory_of, save_adapter, widen_rank
from deltamem_jax.config import DeltaMemConfig, OutputInit, UpdateMode, WriteGranularity
from deltamem_jax.delta_rule import WriteInputs, read, write_chunked, write_scan, write_step
from deltamem_jax.forward import forward
from deltamem_jax.memory import DeltaMem, DeltaMemAttention, MemoryParam
from deltamem_jax.state import MemoryState, WriteControl, WriteMode, message_slots

__all__ = [
    "DeltaMem",
    "DeltaMemAttention",
    "DeltaMemConfig",
    "MemoryParam",
    "MemoryState",
    "OutputInit",
    "UpdateMode",
    "WriteControl",
    "WriteGranularity",
    "WriteInputs",
    "WriteMode",
    "attach",
    "detach",
    "forward",
    "load_adapter",
    "memory_of",
    "message_slots",
    "read",
    "save_adapter",
    "widen_rank",
    "write_chunked",
    "write_scan",
    "write_step",
]

from deltamem_jax.decoding import Sampling, generate  # noqa: E402
from deltamem_jax.session import Mode, Session  # noqa: E402

__all__ += ["Mode", "Sampling", "Session", "generate"]
