"""δ-mem configuration, and conversion from/to the official `delta_mem_config.json`."""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path
from typing import Any


class UpdateMode(str, enum.Enum):
    STANDARD = "standard"  # S' = diag(λ) S + diag(β)(v − S k) kᵀ
    NO_LAMBDA = "no_lambda"  # S' = S + diag(β)(v − S k) kᵀ
    LAMBDA_OUTSIDE = "lambda_outside"  # S' = diag(λ)(S − diag(β) S k kᵀ) + diag(β) v kᵀ


class WriteGranularity(str, enum.Enum):
    TOKEN = "token"  # one write per valid token (TSW, MSW)
    MESSAGE_MEAN = "message_mean"  # one write per message id from its tokens' mean (SSW)


class OutputInit(str, enum.Enum):
    ZERO = "zero"  # corrections start at exactly zero: the model equals the backbone
    BASE_SLICE = "base_slice"  # first min(r, in) columns from the base weight
    BASE_SLICE_FIXED = "base_slice_fixed"  # first min(width, r, in) columns from the base weight
    RANDOM = "random"  # kaiming-uniform × online_gain


BRANCHES = ("q", "k", "v", "o")


@dataclasses.dataclass(frozen=True)
class DeltaMemConfig:
    """What the official δ-mem config means, minus its archived variants.

    Defaults are the recipe of the paper (rank-8 TSW correcting q and o).
    """

    rank: int = 8
    alpha: float = 16.0
    num_state_heads: int = 1  # sub-states per layer (4 for MSW)
    write_granularity: WriteGranularity = WriteGranularity.TOKEN
    update_mode: UpdateMode = UpdateMode.STANDARD
    couple_lambda: bool = True  # λ = 1 − β; otherwise λ has its own projection
    normalize_qk: bool = True  # q, k = l2norm(tanh(·)) per sub-state
    rankwise_gates: bool = True  # one gate per state row; otherwise one per sub-state
    branches: tuple[str, ...] = ("q", "o")  # which attention projections get corrections
    target_layers: tuple[int, ...] = ()  # empty = every layer
    output_init: OutputInit = OutputInit.BASE_SLICE_FIXED
    online_gain: float = 0.05
    base_slice_width: int = 8
    beta_bias_init: float = -1.5
    # Multi-token writer (not official fields). "auto": the token scan on CPU, where the
    # 8×8 recurrence costs microseconds per token and the chunked form, which builds
    # [c, c] matrices per state row, measured slower at every size here, 1.04–73× (scripts/bench_writers.py);
    # the chunked form on GPU/TPU, where a long sequential loop is what costs.
    writer: str = "auto"  # auto | scan | chunked
    chunk_size: int = 64  # chunk length of the chunked writer

    def __post_init__(self):
        object.__setattr__(self, "write_granularity", WriteGranularity(self.write_granularity))
        object.__setattr__(self, "update_mode", UpdateMode(self.update_mode))
        object.__setattr__(self, "output_init", OutputInit(self.output_init))
        object.__setattr__(self, "branches", tuple(self.branches))
        object.__setattr__(self, "target_layers", tuple(int(i) for i in self.target_layers))
        if self.writer not in ("auto", "scan", "chunked"):
            raise ValueError(f"writer must be auto, scan or chunked, got {self.writer!r}")
        bad = [b for b in self.branches if b not in BRANCHES]
        if bad or len(set(self.branches)) != len(self.branches):
            raise ValueError(f"branches must be distinct names from {BRANCHES}, got {self.branches}")
        for name in ("rank", "num_state_heads", "base_slice_width", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")

    @property
    def width(self) -> int:
        """R = rank × sub-states: the width of a layer's concatenated read."""
        return self.rank * self.num_state_heads

    @property
    def num_gates(self) -> int:
        """G: write gates per token (one per state row, or one per sub-state)."""
        return self.width if self.rankwise_gates else self.num_state_heads

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def layer_enabled(self, num_layers: int) -> list[bool]:
        if not self.target_layers:
            return [True] * num_layers
        out_of_range = [i for i in self.target_layers if not 0 <= i < num_layers]
        if out_of_range:
            raise ValueError(f"target_layers {out_of_range} outside a {num_layers}-layer backbone")
        return [i in self.target_layers for i in range(num_layers)]

    # -- official format -------------------------------------------------------------

    @classmethod
    def from_official(cls, raw: dict[str, Any]) -> DeltaMemConfig:
        """Reads an official `delta_mem_config.json` dict.

        Missing fields take the official code's defaults (which differ from ours:
        output_init "zero", delta_heads q,k,v,o). Archived features set to anything but
        their defaults are refused, and so are unknown fields.
        """
        unknown = sorted(set(raw) - set(_OFFICIAL_DEFAULTS) - set(_ARCHIVED_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown δ-mem config fields: {unknown}")
        changed = {
            k: raw[k]
            for k, default in _ARCHIVED_DEFAULTS.items()
            if k in raw and _normalize(raw[k]) != _normalize(default)
        }
        if changed:
            raise ValueError(
                f"δ-mem config uses archived features this port does not implement: {changed}"
            )
        o = {**_OFFICIAL_DEFAULTS, **{k: v for k, v in raw.items() if k in _OFFICIAL_DEFAULTS}}
        heads = o["delta_heads"]
        if isinstance(heads, str):
            heads = [h for h in heads.replace(" ", "").split(",") if h]
        heads = tuple(dict.fromkeys(h.lower() for h in heads if h.lower() != "none"))
        return cls(
            rank=int(o["rank"]),
            alpha=float(o["alpha"]),
            num_state_heads=int(o["num_state_heads"]),
            write_granularity=o["memory_write_granularity"],
            update_mode=o["state_update_mode"],
            couple_lambda=bool(o["couple_lambda"]),
            normalize_qk=bool(o["normalize_qk"]),
            rankwise_gates=bool(o["rankwise_gates"]),
            branches=heads,
            target_layers=tuple(o["target_layers"]),
            output_init=o["output_init"],
            online_gain=float(o["online_gain"]),
            base_slice_width=int(o["base_slice_ref_width"]),
            beta_bias_init=float(o["beta_bias_init"]),
        )

    def to_official(self) -> dict[str, Any]:
        """The official config dict (archived fields at their defaults)."""
        return {
            **_OFFICIAL_DEFAULTS,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in _ARCHIVED_DEFAULTS.items()},
            "rank": self.rank,
            "alpha": self.alpha,
            "beta_bias_init": self.beta_bias_init,
            "normalize_qk": self.normalize_qk,
            "couple_lambda": self.couple_lambda,
            "state_update_mode": self.update_mode.value,
            "rankwise_gates": self.rankwise_gates,
            "output_init": self.output_init.value,
            "base_slice_ref_width": self.base_slice_width,
            "online_gain": self.online_gain,
            "num_state_heads": self.num_state_heads,
            "memory_write_granularity": self.write_granularity.value,
            "target_modules": ["self_attn"],
            "target_layers": list(self.target_layers),
            "delta_heads": list(self.branches),
        }

    @classmethod
    def load(cls, path: str | Path) -> DeltaMemConfig:
        """Reads `delta_mem_config.json` (a file, or a folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "delta_mem_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no δ-mem config at {path}")
        try:
            return cls.from_official(json.loads(path.read_text()))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e


def _normalize(v):
    return list(v) if isinstance(v, (tuple, list)) else v


# Official fields that this port implements, with the official code's defaults.
_OFFICIAL_DEFAULTS: dict[str, Any] = {
    "rank": 8,
    "alpha": 16.0,
    "beta_bias_init": -1.5,
    "normalize_qk": True,
    "couple_lambda": True,
    "state_update_mode": "standard",
    "rankwise_gates": True,
    "output_init": "zero",
    "base_slice_ref_width": 8,
    "online_gain": 0.05,
    "num_state_heads": 1,
    "memory_write_granularity": "token",
    "target_layers": [],
    "delta_heads": ["q", "k", "v", "o"],
}

# Official fields for variants this port refuses unless they hold these defaults.
_ARCHIVED_DEFAULTS: dict[str, Any] = {
    "target_modules": ["self_attn"],
    "num_memory_partitions": 1,
    "num_global_memory_partitions": 0,
    "memory_partition_routing": "soft",
    "memory_partition_basis": "shared",
    "tie_memory_partition_read_write": False,
    "memory_partition_read_mode": "softmax",
    "memory_partition_sigmoid_gate_bias_init": -2.0,
    "slot_read_top_k": 0,
    "global_memory_mode": "shared_rw",
    "global_memory_read_top_k": 0,
    "global_memory_merge_mode": "gated_residual",
    "global_memory_gate_bias_init": -2.0,
    "global_memory_read_logit_bias": 0.0,
    "memory_reader_layers": [],
    "memory_reader_hidden_size": 1024,
    "memory_reader_residual_scale": 0.1,
    "memory_reader_read_only": True,
    "memory_readout_mode": "delta",
    "memory_write_source": "learned_hidden",
    "memory_write_proposals_per_message": 2,
    "synthetic_memory_slots": 1,
    "latent_memory_layers": [],
    "latent_memory_hidden_size": 1024,
    "latent_memory_residual_scale": 0.1,
    "latent_memory_slots": 4,
    "latent_memory_init_std": 0.002,
    "latent_gate_init": 0.01,
    "delta_o_rmsnorm": False,
    "delta_o_rmsnorm_eps": 1e-6,
    "trainable_delta_scale": False,
    "delta_scale_init": 1.0,
    "delta_scale_max": 2.0,
    "delta_scale_granularity": "layer",
    "delta_scale_parameterization": "alpha_over_rank",
}
