"""Backbone configuration from a Hugging Face `config.json` through `transformers.AutoConfig` (Llama, Qwen2, Qwen3, SmolLM3)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import jax.numpy as jnp

SUPPORTED = ("llama", "qwen2", "qwen3", "smollm3")
ATTENTION = ("auto", "blockwise", "cudnn")


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
    # Prompt attention (a runtime choice, not part of the checkpoint): "blockwise" (this
    # package's XLA code, any backend), "cudnn" (`jax.nn.dot_product_attention`'s cuDNN flash
    # kernel: a CUDA GPU and bfloat16), or "auto" (cuDNN where it applies, else blockwise).
    attention: str = "auto"

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
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.attention == "cudnn" and (self.dtype != "bfloat16" or self.head_dim % 8 or self.head_dim > 256):
            raise ValueError(f"attention='cudnn' needs dtype bfloat16 (cuDNN has no float32 kernel) and a head_dim that is a "
                             f"multiple of 8 up to 256 (128 before Hopper); got dtype {self.dtype}, head_dim {self.head_dim}")  # fmt: skip

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
    def from_hf(cls, raw: Mapping[str, Any] | Any, dtype: str = "float32", attention: str = "auto") -> ModelConfig:
        """From a Hugging Face `config.json` dict (or a transformers config), read through
        `transformers.AutoConfig`: its defaults per model type, RoPE in the v5 `rope_parameters` or
        the v4 `rope_theta` + `rope_scaling` form (`rope_type` or the older `type`)."""
        family = raw.get("model_type") if isinstance(raw, Mapping) else getattr(raw, "model_type", None)
        if family not in SUPPORTED:
            raise ValueError(f"unsupported model_type {family!r}; supported: {', '.join(SUPPORTED)}")
        c = import_transformers().AutoConfig.for_model(**raw) if isinstance(raw, Mapping) else raw
        sliding = family != "llama" and "sliding_attention" in (getattr(c, "layer_types", None) or ())  # Llama ignores them
        if getattr(c, "use_sliding_window", False) or sliding:
            raise ValueError("sliding-window attention is not supported")
        # transformers 5 keeps RoPE in `rope_parameters`; 4.x in `rope_theta` + `rope_scaling`
        rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
        theta = rope.pop("rope_theta", getattr(c, "rope_theta", 10000.0))
        kind = rope.pop("rope_type", rope.pop("type", "default"))  # pops both
        if kind not in ("default", "linear", "llama3"):
            raise ValueError(f"RoPE type {kind!r} is not supported (default, linear, llama3)")
        heads, bias, eos = c.num_attention_heads, bool(getattr(c, "attention_bias", False)), c.eos_token_id
        return cls(
            family=family,
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=c.num_key_value_heads or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            rms_norm_eps=c.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=None if kind == "default" else tuple(sorted({**rope, "rope_type": kind}.items())),
            tie_word_embeddings=bool(c.tie_word_embeddings),
            qkv_bias=family == "qwen2" or bias,
            o_bias=family != "qwen2" and bias,  # Qwen2's o_proj never has a bias
            mlp_bias=bool(getattr(c, "mlp_bias", False)),
            qk_norm=family == "qwen3",
            # SmolLM3: 1 = the layer uses RoPE (transformers fills in its every-4th-layer default)
            rope_layers=tuple(bool(x) for x in c.no_rope_layers) if family == "smollm3" else (),
            max_position_embeddings=c.max_position_embeddings,
            bos_token_id=c.bos_token_id,
            eos_token_ids=() if eos is None else tuple(eos) if isinstance(eos, list) else (eos,),
            dtype=dtype,
            attention=attention,
        )

    @classmethod
    def load(cls, path: str | Path, dtype: str = "float32", attention: str = "auto") -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_hf(json.loads(path.read_text()), dtype=dtype, attention=attention)


def import_transformers():
    """`transformers`, minus the advice it logs at import when PyTorch is missing: its tokenizers
    and configs, all this package uses, need no torch."""
    with mock.patch.dict(os.environ, TRANSFORMERS_NO_ADVISORY_WARNINGS="1"):
        import transformers
    return transformers
