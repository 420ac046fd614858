"""Attaching δ-mem to a backbone, and the official adapter folder format.

An adapter folder holds `delta_mem_config.json` and the δ-mem tensors under their
official names (`model.layers.{i}.self_attn.memory_q_proj`, …, torch [out, in] layout)
in `delta_mem_adapter.safetensors` (ours and the fixtures) or `delta_mem_adapter.pt`
(the official release; read when torch is installed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltamem_jax.config import DeltaMemConfig
from deltamem_jax.memory import DeltaMem, DeltaMemAttention
from models.decoder import Decoder

CONFIG_FILE = "delta_mem_config.json"
SAFETENSORS_FILE = "delta_mem_adapter.safetensors"
TORCH_FILE = "delta_mem_adapter.pt"


def attach(model: Decoder, config: DeltaMemConfig, seed: int = 0) -> Decoder:
    """Wraps every layer's frozen attention with a freshly initialized δ-mem (in place)."""
    if isinstance(model.layers.attn, DeltaMemAttention):
        raise ValueError("this model already has δ-mem attached; detach() it first")
    config.layer_enabled(model.cfg.num_layers)  # validates target_layers
    base = model.layers.attn
    model.layers.attn = DeltaMemAttention(base, DeltaMem(config, model.cfg, base, nnx.Rngs(seed)))
    return model


def detach(model: Decoder) -> Decoder:
    """Removes δ-mem, leaving the frozen backbone (in place)."""
    if isinstance(model.layers.attn, DeltaMemAttention):
        model.layers.attn = model.layers.attn.base
    return model


def memory_of(model: Decoder) -> DeltaMem:
    attn = model.layers.attn
    if not isinstance(attn, DeltaMemAttention):
        raise ValueError("this model has no δ-mem attached")
    return attn.memory


def _official_tensors(mem: DeltaMem) -> dict[str, np.ndarray]:
    """Our stacked parameters → official per-layer tensors (target layers only)."""
    c = mem.config
    R, G = c.width, c.num_gates
    in_proj = np.asarray(mem.in_proj[...])  # [l, d, 3R + G·sets]
    bias = np.asarray(mem.gate_bias[...])
    out = {}
    enabled = np.asarray(mem.enabled[...])
    for i in np.flatnonzero(enabled):
        p = f"model.layers.{i}.self_attn."
        w = in_proj[i].T  # [3R + G·sets, d]
        out[p + "memory_q_proj"] = w[:R]
        out[p + "memory_k_proj"] = w[R : 2 * R]
        out[p + "memory_v_proj"] = w[2 * R : 3 * R]
        out[p + "beta_proj"] = w[3 * R : 3 * R + G]
        out[p + "beta_bias"] = bias[i, :G]
        if w.shape[0] > 3 * R + G:
            out[p + "lambda_proj"] = w[3 * R + G :]
            out[p + "lambda_bias"] = bias[i, G:]
        for b in c.branches:
            d = np.asarray(getattr(mem, f"delta_{b}")[...][i])  # [R, ...]
            out[p + f"delta_{b}_proj"] = d.reshape(R, -1).T
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def save_adapter(model: Decoder, folder: str | Path) -> Path:
    """Writes the official adapter folder atomically (a temp folder renamed into place)."""
    from safetensors.numpy import save_file

    mem = memory_of(model)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(mem.config.to_official(), indent=2))
        save_file(_official_tensors(mem), str(tmp / SAFETENSORS_FILE))
        umask = os.umask(0)
        os.umask(umask)  # mkdtemp makes a private folder: give it the usual permissions
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_adapter_tensors(folder: Path) -> dict[str, np.ndarray]:
    if (folder / SAFETENSORS_FILE).is_file():
        from safetensors.numpy import load_file

        return load_file(str(folder / SAFETENSORS_FILE))
    if (folder / TORCH_FILE).is_file():
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"{folder / TORCH_FILE} needs torch to read (pip install deltamem-jax[torch])") from e
        sd = torch.load(folder / TORCH_FILE, map_location="cpu", weights_only=True)
        return {k: v.detach().float().numpy() for k, v in sd.items()}
    raise FileNotFoundError(f"no {SAFETENSORS_FILE} or {TORCH_FILE} in {folder}")


def adapter_identity(folder: str | Path) -> dict[str, str]:
    """What names an adapter in a result file: its folder, the sha256 of its weights file,
    and, for one trained here, the training command and steps (`training_metadata.json`).
    A folder path alone does not say which weights were there when a result was measured."""
    folder = Path(folder)
    weights = next((folder / f for f in (SAFETENSORS_FILE, TORCH_FILE) if (folder / f).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"no {SAFETENSORS_FILE} or {TORCH_FILE} in {folder}")
    out = {"path": str(folder), "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    meta = folder / "training_metadata.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        out.update(command=str(m.get("command", "")), steps=str(m.get("optimizer_updates", "")))
    return out


def load_adapter(model: Decoder, folder: str | Path) -> DeltaMemConfig:
    """Attaches δ-mem to `model` with the parameters of an official adapter folder.

    A mismatch with the backbone (layer count, widths, rank, sub-states) is an error
    that names the tensor and both shapes.
    """
    folder = Path(folder)
    config = DeltaMemConfig.load(folder)
    tensors = read_adapter_tensors(folder)
    tensors = {k.removeprefix("base_model."): v for k, v in tensors.items()}
    cfg = model.cfg
    L = cfg.num_layers
    layers = sorted({int(k.split(".")[2]) for k in tensors if k.startswith("model.layers.")})
    if not layers or layers[-1] >= L:
        raise ValueError(f"{folder}: adapter has layers {layers[:1]}..{layers[-1:]} but the backbone has {L} layers")
    targets = [i for i, on in enumerate(config.layer_enabled(L)) if on]
    if layers != targets:
        raise ValueError(f"{folder}: adapter holds layers {layers}, its config targets {targets} of {L}")
    previous = model.layers.attn  # restored if anything below fails
    try:
        detach(model)
        attach(model, config)
        mem = memory_of(model)
        expected = _official_tensors(mem)
        extra = sorted(
            k for k in tensors
            if k not in expected and not any(k.endswith(f"delta_{b}_proj") for b in "qkvo")
        )
        if extra:
            raise ValueError(f"{folder}: unexpected adapter tensors {extra[:4]}")
        for name, want in expected.items():
            if name not in tensors:
                raise ValueError(f"{folder}: adapter is missing {name}")
            if tuple(tensors[name].shape) != want.shape:
                raise ValueError(
                    f"{folder}: {name} has shape {tuple(tensors[name].shape)}, this backbone and config need "
                    f"{want.shape} (hidden {cfg.hidden_size}, rank {config.rank} × {config.num_state_heads} sub-states)"
                )
        c = config
        R, G = c.width, c.num_gates
        in_proj = np.array(mem.in_proj[...])
        bias = np.array(mem.gate_bias[...])
        deltas = {b: np.array(getattr(mem, f"delta_{b}")[...]) for b in c.branches}
        for i in targets:
            p = f"model.layers.{i}.self_attn."
            rows = [tensors[p + n] for n in ("memory_q_proj", "memory_k_proj", "memory_v_proj", "beta_proj")]
            gate_bias = [tensors[p + "beta_bias"]]
            if in_proj.shape[-1] > 3 * R + G:
                rows.append(tensors[p + "lambda_proj"])
                gate_bias.append(tensors[p + "lambda_bias"])
            in_proj[i] = np.concatenate(rows, 0).T
            bias[i] = np.concatenate(gate_bias)
            for b in c.branches:
                deltas[b][i] = tensors[p + f"delta_{b}_proj"].T.reshape(deltas[b].shape[1:])
        mem.in_proj[...] = jnp.asarray(in_proj)
        mem.gate_bias[...] = jnp.asarray(bias)
        for b in c.branches:
            getattr(mem, f"delta_{b}")[...] = jnp.asarray(deltas[b])
    except BaseException:
        model.layers.attn = previous
        raise
    return config


def widen_rank(model: Decoder, rank: int, noise: float = 0.1, seed: int = 0) -> DeltaMemConfig:
    """Grows the attached memory's rank in place (TSW/SSW: one sub-state), keeping what it learned.

    The old r×r state becomes the top-left block of the new one. New memory key, query and
    value columns start at `noise` × each layer's spread of the trained ones, new write
    gates at zero weight and the mean trained bias, new correction rows at zero; the old
    corrections are rescaled so that scale = α / rank stays what it was. With `noise=0`
    the widened model computes exactly what it did (the new rows of the state stay zero);
    with a small `noise` the new rows hold small writes from the start, so training can use
    them (the correction rows get a gradient). Returns the new config.
    """
    mem = memory_of(model)
    c = mem.config
    if c.num_state_heads != 1:
        raise ValueError(f"widen_rank grows one state per layer; this memory has {c.num_state_heads} sub-states")
    if rank <= c.rank:
        raise ValueError(f"widen_rank needs a rank above the current {c.rank}, got {rank}")
    new = dataclasses.replace(c, rank=rank)
    R, G, extra = c.width, c.num_gates, new.width - c.width
    in_proj = np.asarray(mem.in_proj[...])  # [l, d, 3R + G·sets]
    bias = np.asarray(mem.gate_bias[...])  # [l, G·sets]
    sets = bias.shape[-1] // G  # β, and λ when it has its own projection
    L, d = in_proj.shape[:2]
    rng = np.random.default_rng(seed)
    cols, biases = [], []
    for i in range(3):  # memory q | k | v
        block = in_proj[..., i * R : (i + 1) * R]
        spread = block.std(axis=(1, 2), keepdims=True)  # [l, 1, 1]
        cols += [block, noise * spread * rng.standard_normal((L, d, extra)).astype(np.float32)]
    new_gates = extra if c.rankwise_gates else 0
    for j in range(sets):  # β (and λ) gates: one per state row when rankwise
        g = in_proj[..., 3 * R + j * G : 3 * R + (j + 1) * G]
        b = bias[:, j * G : (j + 1) * G]
        cols += [g, np.zeros((L, d, new_gates), np.float32)]
        biases += [b, np.repeat(b.mean(axis=1, keepdims=True), new_gates, axis=1)]
    keep = c.scale / new.scale
    deltas = {}
    for branch in c.branches:
        w = np.asarray(getattr(mem, f"delta_{branch}")[...])  # [l, R, ...]
        deltas[branch] = np.concatenate([keep * w, np.zeros((L, extra, *w.shape[2:]), np.float32)], axis=1)
    detach(model)
    attach(model, new)
    wide = memory_of(model)
    wide.enabled[...] = mem.enabled[...]
    wide.in_proj[...] = jnp.asarray(np.concatenate(cols, -1))
    wide.gate_bias[...] = jnp.asarray(np.concatenate(biases, -1))
    for branch, w in deltas.items():
        getattr(wide, f"delta_{branch}")[...] = jnp.asarray(w)
    return new
