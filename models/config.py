"""Backbone configuration read from a Hugging Face `config.json` (Llama, Qwen2, Qwen3, SmolLM3)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

SUPPORTED = ("llama", "qwen2", "qwen3", "smollm3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # one of SUPPORTED
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # llama3 / linear, as sorted items
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2; Llama's attention_bias
    o_bias: bool = False  # attention_bias of Llama, Qwen3, SmolLM3
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: per-head RMSNorm of q and k before RoPE
    rope_layers: tuple[bool, ...] = ()  # per layer: apply RoPE (SmolLM3 skips every 4th)
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"  # weights and activations; the memory is always float32

    def __post_init__(self):
        if self.family not in SUPPORTED:
            raise ValueError(f"unsupported model family {self.family!r}; supported: {SUPPORTED}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} heads not divisible by {self.num_kv_heads} KV heads")
        if not self.rope_layers:
            object.__setattr__(self, "rope_layers", (True,) * self.num_layers)
        if len(self.rope_layers) != self.num_layers:
            raise ValueError(f"rope_layers has {len(self.rope_layers)} entries for {self.num_layers} layers")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, raw: dict[str, Any], dtype: str = "float32") -> ModelConfig:
        """Builds the config from a Hugging Face `config.json` dict (v4 or v5 layout)."""
        family = raw.get("model_type")
        if family not in SUPPORTED:
            raise ValueError(f"unsupported model_type {family!r}; supported: {SUPPORTED}")
        if raw.get("use_sliding_window") or (
            family != "llama" and any(t == "sliding_attention" for t in raw.get("layer_types") or [])
        ):
            raise ValueError("sliding-window attention is not supported")
        n_layers = raw["num_hidden_layers"]
        heads = raw["num_attention_heads"]
        rope = dict(raw.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
        scaling = raw.get("rope_scaling") or rope
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            raise ValueError(f"RoPE type {kind!r} is not supported (default, linear, llama3)")
        scaling = None if kind == "default" else tuple(sorted({**scaling, "rope_type": kind}.items()))
        if family == "smollm3":
            no_rope = raw.get("no_rope_layers")
            if no_rope is None:  # transformers default: every `no_rope_layer_interval`-th layer has none
                every = raw.get("no_rope_layer_interval", 4)
                no_rope = [int((i + 1) % every != 0) for i in range(n_layers)]
            rope_layers = tuple(bool(x) for x in no_rope)  # 1 = uses RoPE
        else:
            rope_layers = (True,) * n_layers
        eos = raw.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        bias = bool(raw.get("attention_bias", False))
        return cls(
            family=family,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=n_layers,
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or bias,
            o_bias=family != "qwen2" and bias,  # Qwen2's o_proj never has a bias
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            rope_layers=rope_layers,
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos,
            dtype=dtype,
        )

    @classmethod
    def load(cls, path: str | Path, dtype: str = "float32") -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_hf(json.loads(path.read_text()), dtype=dtype)
