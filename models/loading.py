"""Weights with Hugging Face names → our stacked parameters, through one shape-checked table."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.decoder import Decoder

# (Hugging Face name, our path, transform of the torch [out, in] tensor). `{i}` = layer.
_Transform = Callable[[Any, ModelConfig], Any]


def _t(w, c):  # [out, in] -> [in, out]
    return w.T


def _q_in(w, c):  # [n*h, d] -> [d, n, h]
    return w.T.reshape(c.hidden_size, c.num_heads, c.head_dim)


def _kv_in(w, c):  # [k*h, d] -> [d, k, h]
    return w.T.reshape(c.hidden_size, c.num_kv_heads, c.head_dim)


def _o_in(w, c):  # [d, n*h] -> [n, h, d]
    return w.T.reshape(c.num_heads, c.head_dim, c.hidden_size)


def _q_bias(w, c):
    return w.reshape(c.num_heads, c.head_dim)


def _kv_bias(w, c):
    return w.reshape(c.num_kv_heads, c.head_dim)


def _same(w, c):
    return w


def weight_table(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], _Transform]]:
    """Every tensor the backbone needs, by its Hugging Face name."""
    p = "model.layers.{i}."
    table = [
        ("model.embed_tokens.weight", ("embed",), _same),
        ("model.norm.weight", ("final_norm",), _same),
        (p + "input_layernorm.weight", ("layers", "input_norm"), _same),
        (p + "post_attention_layernorm.weight", ("layers", "post_attention_norm"), _same),
        (p + "self_attn.q_proj.weight", ("layers", "attn", "q_proj"), _q_in),
        (p + "self_attn.k_proj.weight", ("layers", "attn", "k_proj"), _kv_in),
        (p + "self_attn.v_proj.weight", ("layers", "attn", "v_proj"), _kv_in),
        (p + "self_attn.o_proj.weight", ("layers", "attn", "o_proj"), _o_in),
        (p + "mlp.gate_proj.weight", ("layers", "mlp", "gate_proj"), _t),
        (p + "mlp.up_proj.weight", ("layers", "mlp", "up_proj"), _t),
        (p + "mlp.down_proj.weight", ("layers", "mlp", "down_proj"), _t),
    ]
    if not cfg.tie_word_embeddings:
        table.append(("lm_head.weight", ("lm_head",), _t))
    if cfg.qkv_bias:
        table += [
            (p + "self_attn.q_proj.bias", ("layers", "attn", "q_bias"), _q_bias),
            (p + "self_attn.k_proj.bias", ("layers", "attn", "k_bias"), _kv_bias),
            (p + "self_attn.v_proj.bias", ("layers", "attn", "v_bias"), _kv_bias),
        ]
    if cfg.o_bias:
        table.append((p + "self_attn.o_proj.bias", ("layers", "attn", "o_bias"), _same))
    if cfg.qk_norm:
        table += [
            (p + "self_attn.q_norm.weight", ("layers", "attn", "q_norm"), _same),
            (p + "self_attn.k_norm.weight", ("layers", "attn", "k_norm"), _same),
        ]
    if cfg.mlp_bias:
        table += [
            (p + "mlp.gate_proj.bias", ("layers", "mlp", "gate_bias"), _same),
            (p + "mlp.up_proj.bias", ("layers", "mlp", "up_bias"), _same),
            (p + "mlp.down_proj.bias", ("layers", "mlp", "down_bias"), _same),
        ]
    return table


# Tensors a checkpoint may carry that the model derives itself.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def build_decoder(cfg: ModelConfig, tensors: Mapping[str, Any]) -> Decoder:
    """A Decoder whose parameters come from `tensors` (Hugging Face names, torch layout).

    Every expected tensor must be present with the right shape; unexpected ones are an
    error too (a checkpoint for another architecture should not load silently).
    """
    abstract = nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    used = set()
    for hf_name, path, transform in weight_table(cfg):
        target = _get(pure, path)
        names = [hf_name.format(i=i) for i in range(cfg.num_layers)] if "{i}" in hf_name else [hf_name]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise KeyError(f"checkpoint is missing {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        parts = []
        for n in names:
            expected = target.shape[1:] if "{i}" in hf_name else target.shape
            try:  # a reshaping transform fails on a wrong size before the check below
                w = transform(jnp.asarray(tensors[n]), cfg)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{n}: shape {tuple(tensors[n].shape)} does not fit the config ({e})") from e
            if tuple(w.shape) != tuple(expected):
                raise ValueError(f"{n}: shape {tuple(tensors[n].shape)} does not fit the config (expected {expected} after transform)")
            parts.append(w.astype(target.dtype))
            used.add(n)
        _set(pure, path, jnp.stack(parts) if "{i}" in hf_name else parts[0])
    unexpected = sorted(
        n for n in tensors
        if n not in used and not n.endswith(_IGNORED_SUFFIXES)
        and not (n == "lm_head.weight" and cfg.tie_word_embeddings)
    )
    if unexpected:
        raise ValueError(f"checkpoint has tensors this {cfg.family} config does not use: {unexpected[:5]}")
    _set(pure, ("layers", "use_rope"), jnp.asarray(cfg.rope_layers, bool))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def read_safetensors(folder: Path) -> dict[str, jax.Array]:
    """All tensors of a (possibly sharded) safetensors checkpoint folder."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    out = {}
    for f in files:
        if not (folder / f).is_file():
            raise FileNotFoundError(f"no {f} in {folder}")
        with safe_open(folder / f, framework="flax") as fh:
            for name in fh.keys():
                out[name] = fh.get_tensor(name)
    return out


def load_pretrained(folder: str | Path, dtype: str = "float32", attention: str = "auto") -> tuple[Decoder, ModelConfig]:
    """A Hugging Face checkpoint folder (config.json + safetensors) → (Decoder, config);
    `attention` as `ModelConfig.attention`."""
    folder = Path(folder)
    cfg = ModelConfig.load(folder, dtype=dtype, attention=attention)
    return build_decoder(cfg, read_safetensors(folder)), cfg


def _get(tree: dict, path: tuple[str, ...]):
    for p in path:
        if p not in tree:
            raise KeyError(f"model has no parameter {'/'.join(path)}")
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


__all__ = ["build_decoder", "load_pretrained", "read_safetensors", "weight_table"]


def load_gguf(path: str | Path | None = None, dtype: str = "float32", attention: str = "auto", checkpoint=None):
    """A llama GGUF file (default: the embedded SmolLM2-135M-Instruct) → (Decoder, config, Tokenizer).

    Quantized tensors are dequantized to `dtype`; no torch needed. `attention` as `ModelConfig.attention`.
    `checkpoint`: the file already read by `models.gguf.read_gguf` (with or without its
    tensors, say for its tokenizer first), used instead of reading `path` again.
    """
    from models.gguf import read_gguf
    from models.tokenizer import Tokenizer

    checkpoint = (read_gguf(path) if checkpoint is None else checkpoint).with_tensors()
    cfg = ModelConfig.from_hf(checkpoint.config, dtype=dtype, attention=attention)
    return build_decoder(cfg, checkpoint.tensors), cfg, Tokenizer.from_gguf(checkpoint)
