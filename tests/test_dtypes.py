"""bf16 backbones: weights and activations in bf16, the memory and its update in float32."""

from pathlib import Path

import chex
import jax.numpy as jnp
import numpy as np

import models
from deltamem_jax import MemoryState, WriteControl, forward, load_adapter, memory_of
from models.decoder import KVCache

FIXTURE = Path(__file__).parent / "fixtures" / "official_tiny" / "tsw"


def _run(dtype):
    model, cfg = models.load_pretrained(FIXTURE / "backbone", dtype=dtype)
    load_adapter(model, FIXTURE / "adapter")
    exp = np.load(FIXTURE / "expected.npz")
    ids = jnp.asarray(exp["prompt_ids"], jnp.int32)
    b, t = ids.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    mem = MemoryState.zeros(cfg.num_layers, b, memory_of(model).config)
    logits, cache, mem = forward(model, ids, pos, jnp.ones((b, t), bool), KVCache.create(cfg, b, t), mem, WriteControl(), attend_cache=False)
    return model, logits, cache, mem, exp


def test_bf16_backbone_keeps_float32_memory():
    model, logits, cache, mem, exp = _run("bfloat16")
    assert model.layers.attn.base.q_proj[...].dtype == jnp.bfloat16
    assert memory_of(model).in_proj[...].dtype == jnp.float32  # memory parameters stay float32
    chex.assert_type([mem.S, logits], [jnp.float32, jnp.float32])
    chex.assert_type([cache.k, cache.v], [jnp.bfloat16, jnp.bfloat16])
    # close to the float32 reference at bf16 precision, far closer than the δ-mem signal
    assert np.abs(np.asarray(logits) - exp["prefill_logits"]).max() < 0.1
    assert np.abs(np.asarray(mem.S)[:, :, 0] - exp["state_after_prefill"]).max() < 0.01
