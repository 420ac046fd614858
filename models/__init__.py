"""Frozen Llama-family backbones (Llama/SmolLM2, Qwen2, Qwen3, SmolLM3) and their loaders."""

from models.config import ModelConfig
from models.decoder import Attention, Decoder, KVCache
from models.loading import build_decoder, load_gguf, load_pretrained
from models.sharding import ShardingRules, make_mesh, shard_model

__all__ = [
    "Attention",
    "Decoder",
    "KVCache",
    "ModelConfig",
    "ShardingRules",
    "build_decoder",
    "load_gguf",
    "load_pretrained",
    "make_mesh",
    "shard_model",
]
