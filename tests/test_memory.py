"""The δ-mem module (`deltamem_jax.memory`, `deltamem_jax.state`): features, gates, write modes.

Feature tests call one layer's `DeltaMem.features` directly (the module holds parameters
stacked over layers; `_layer` slices out one layer, as the decoder's scan does).
"""

from __future__ import annotations

from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deltamem_jax
from deltamem_jax import DeltaMem, DeltaMemConfig, MemoryState, WriteControl, WriteMode, forward, message_slots
from models import KVCache, load_pretrained

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official_tiny"
BACKBONE = FIXTURES / "tsw" / "backbone"
B, T = 2, 5
SIG = jax.nn.sigmoid


@pytest.fixture(scope="module")
def backbone():
    """(model, cfg): the tsw fixture backbone (2 layers, hidden 64). Tests must not attach to it."""
    return load_pretrained(BACKBONE)


def _fresh():
    return load_pretrained(BACKBONE)


def _memory(backbone, config: DeltaMemConfig, seed: int = 0) -> DeltaMem:
    model, cfg = backbone
    return DeltaMem(config, cfg, model.layers.attn, nnx.Rngs(seed))


def _layer(module: nnx.Module, i: int) -> nnx.Module:
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def _x(d: int, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (B, T, d), jnp.float32)


def _randomize_gates(mem: DeltaMem, seed: int = 1) -> None:
    """Nonzero gate projections (they start at zero), so the gates vary per token and row."""
    c = mem.config
    w = np.array(mem.in_proj[...])
    rng = np.random.default_rng(seed)
    w[..., 3 * c.width :] = rng.normal(0.0, 0.3, w[..., 3 * c.width :].shape)
    mem.in_proj[...] = jnp.asarray(w)
    mem.gate_bias[...] = jnp.asarray(rng.normal(0.0, 1.0, mem.gate_bias[...].shape), jnp.float32)


def _gate_logits(layer: DeltaMem, x) -> np.ndarray:
    """x · W_gates + b in float64, independent of the library's einsum."""
    R = layer.config.width
    w = np.asarray(layer.in_proj[...], np.float64)[:, 3 * R :]
    return np.asarray(x, np.float64) @ w + np.asarray(layer.gate_bias[...], np.float64)


def _sig(z):
    return 1.0 / (1.0 + np.exp(-z))


# ------------------------------------------------------------------------ features


@pytest.mark.parametrize("m", [1, 4])
def test_feature_shapes(backbone, m):
    _, cfg = backbone
    c = DeltaMemConfig(rank=8, num_state_heads=m)
    mem = _memory(backbone, c)
    R = 8 * m
    chex.assert_shape(mem.in_proj[...], (cfg.num_layers, cfg.hidden_size, 3 * R + R))
    chex.assert_shape(mem.gate_bias[...], (cfg.num_layers, R))
    chex.assert_shape(mem.delta_q[...], (cfg.num_layers, R, cfg.num_heads, cfg.head_dim))
    chex.assert_shape(mem.delta_o[...], (cfg.num_layers, R, cfg.hidden_size))
    assert not hasattr(mem, "delta_k") and not hasattr(mem, "delta_v")

    f = _layer(mem, 0).features(_x(cfg.hidden_size))
    chex.assert_shape(list(f), (B, T, m, 8))
    chex.assert_type(list(f), jnp.float32)
    chex.assert_tree_all_finite(f)
    # normalize_qk: unit norm per sub-state
    np.testing.assert_allclose(np.linalg.norm(f.q, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(f.k, axis=-1), 1.0, atol=1e-5)
    # zero gate projections: β = sigmoid(beta_bias_init) everywhere; standard: λ = 1 − β, μ = 1
    np.testing.assert_allclose(f.beta, SIG(-1.5), rtol=1e-6)
    np.testing.assert_allclose(f.lam, 1.0 - f.beta, rtol=1e-6)
    np.testing.assert_array_equal(f.mu, 1.0)


def test_features_without_qk_normalization(backbone):
    _, cfg = backbone
    mem = _memory(backbone, DeltaMemConfig(normalize_qk=False))
    layer = _layer(mem, 1)
    x = _x(cfg.hidden_size)
    f = layer.features(x)
    R = 8
    z = np.asarray(x, np.float64) @ np.asarray(layer.in_proj[...], np.float64)
    np.testing.assert_allclose(f.q[:, :, 0], z[..., :R], atol=1e-5)
    np.testing.assert_allclose(f.k[:, :, 0], z[..., R : 2 * R], atol=1e-5)
    np.testing.assert_allclose(f.v[:, :, 0], z[..., 2 * R : 3 * R], atol=1e-5)


def test_rankwise_gates(backbone):
    """rankwise_gates: one gate per state row, laid out sub-state-major."""
    _, cfg = backbone
    mem = _memory(backbone, DeltaMemConfig(num_state_heads=4))
    _randomize_gates(mem)
    layer = _layer(mem, 0)
    x = _x(cfg.hidden_size)
    f = layer.features(x)
    want = _sig(_gate_logits(layer, x)).reshape(B, T, 4, 8)
    np.testing.assert_allclose(f.beta, want, atol=1e-5)
    assert np.ptp(np.asarray(f.beta), axis=-1).max() > 1e-3  # really varies over rows


def test_sub_state_gates(backbone):
    """rankwise_gates=False: one gate per sub-state, broadcast over its rows."""
    _, cfg = backbone
    c = DeltaMemConfig(num_state_heads=4, rankwise_gates=False)
    assert c.num_gates == 4
    mem = _memory(backbone, c)
    chex.assert_shape(mem.in_proj[...], (cfg.num_layers, cfg.hidden_size, 3 * 32 + 4))
    chex.assert_shape(mem.gate_bias[...], (cfg.num_layers, 4))
    _randomize_gates(mem)
    layer = _layer(mem, 1)
    x = _x(cfg.hidden_size)
    f = layer.features(x)
    chex.assert_shape(f.beta, (B, T, 4, 8))
    g = _sig(_gate_logits(layer, x))  # [b, t, 4]
    np.testing.assert_allclose(f.beta, np.broadcast_to(g[..., None], (B, T, 4, 8)), atol=1e-5)
    np.testing.assert_allclose(f.lam, 1.0 - f.beta, atol=1e-6)
    assert np.ptp(np.asarray(f.beta), axis=-2).max() > 1e-3  # differs between sub-states


def test_uncoupled_lambda(backbone):
    """couple_lambda=False: λ has its own projection (zero) and bias (−beta_bias_init = +1.5)."""
    _, cfg = backbone
    c = DeltaMemConfig(num_state_heads=2, couple_lambda=False)
    mem = _memory(backbone, c)
    R = 16
    chex.assert_shape(mem.in_proj[...], (cfg.num_layers, cfg.hidden_size, 3 * R + 2 * R))
    chex.assert_shape(mem.gate_bias[...], (cfg.num_layers, 2 * R))
    np.testing.assert_array_equal(mem.in_proj[...][..., 3 * R :], 0.0)
    np.testing.assert_array_equal(mem.gate_bias[...][:, :R], -1.5)
    np.testing.assert_array_equal(mem.gate_bias[...][:, R:], 1.5)
    f = _layer(mem, 0).features(_x(cfg.hidden_size))
    chex.assert_shape([f.beta, f.lam, f.mu], (B, T, 2, 8))
    np.testing.assert_allclose(f.beta, SIG(-1.5), rtol=1e-6)
    np.testing.assert_allclose(f.lam, SIG(1.5), rtol=1e-6)
    np.testing.assert_array_equal(f.mu, 1.0)

    # with trained projections λ follows its own columns, not 1 − β
    _randomize_gates(mem)
    layer = _layer(mem, 0)
    x = _x(cfg.hidden_size)
    f = layer.features(x)
    g = _sig(_gate_logits(layer, x))
    np.testing.assert_allclose(f.beta, g[..., :R].reshape(B, T, 2, 8), atol=1e-5)
    np.testing.assert_allclose(f.lam, g[..., R:].reshape(B, T, 2, 8), atol=1e-5)


@pytest.mark.parametrize("couple", [True, False])
def test_no_lambda(backbone, couple):
    _, cfg = backbone
    mem = _memory(backbone, DeltaMemConfig(update_mode="no_lambda", couple_lambda=couple))
    # no λ at all, so no λ projection even when uncoupled
    chex.assert_shape(mem.in_proj[...], (cfg.num_layers, cfg.hidden_size, 4 * 8))
    f = _layer(mem, 0).features(_x(cfg.hidden_size))
    np.testing.assert_allclose(f.beta, SIG(-1.5), rtol=1e-6)
    np.testing.assert_array_equal(f.lam, 1.0)
    np.testing.assert_array_equal(f.mu, 1.0)


@pytest.mark.parametrize("couple, lam", [(True, 1.0 - SIG(-1.5)), (False, SIG(1.5))])
def test_lambda_outside(backbone, couple, lam):
    _, cfg = backbone
    mem = _memory(backbone, DeltaMemConfig(update_mode="lambda_outside", couple_lambda=couple))
    f = _layer(mem, 1).features(_x(cfg.hidden_size))
    np.testing.assert_allclose(f.lam, lam, rtol=1e-6)
    np.testing.assert_array_equal(f.mu, f.lam)


# ------------------------------------------------------------------------ message slots


@pytest.mark.parametrize(
    "ids, valid, slots",
    [
        ([[-1, 5, 5, 9, 2]], [[1, 1, 1, 1, 1]], [[-1, 1, 1, 2, 0]]),
        # an invalid token never writes, but its id is still held by the valid token after it
        ([[3, 1, 1, 7, 2]], [[1, 0, 1, 1, 1]], [[2, -1, 0, 3, 1]]),
        # an id held only by invalid tokens takes no slot
        ([[0, 4, 9, 4]], [[1, 0, 1, 0]], [[0, -1, 1, -1]]),
        # large, non-contiguous ids (a session's global counter); rows are independent
        ([[1000, 1000, 42, -1], [7, 7, 7, 7]], [[1, 1, 1, 1], [1, 1, 1, 1]], [[1, 1, 0, -1], [0, 0, 0, 0]]),
        # messages need not be contiguous in the sequence
        ([[2, 1, 2, 1, 0]], [[1, 1, 1, 1, 1]], [[2, 1, 2, 1, 0]]),
        ([[-1, -1, 3]], [[0, 1, 1]], [[-1, -1, 0]]),
    ],
)
def test_message_slots(ids, valid, slots):
    out = message_slots(jnp.asarray(ids, jnp.int32), jnp.asarray(valid, bool))
    chex.assert_shape(out, np.shape(ids))
    chex.assert_type(out, jnp.int32)
    np.testing.assert_array_equal(out, slots)
    control = WriteControl.messages(jnp.asarray(ids, jnp.int32), jnp.asarray(valid, bool))
    assert control.mode == WriteMode.MESSAGES
    np.testing.assert_array_equal(control.message_slots, slots)


# ------------------------------------------------------------------------ write modes through the model


def _run(model, cfg, state: MemoryState, control: WriteControl, seed: int = 0):
    tokens = jax.random.randint(jax.random.key(seed), (B, T), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    valid = jnp.ones((B, T), bool)
    logits, _, mem = forward(model, tokens, positions, valid, KVCache.create(cfg, B, T), state, control, attend_cache=False)
    return logits, mem


def _random_state(cfg, config, seed=3) -> MemoryState:
    shape = (cfg.num_layers, B, config.num_state_heads, config.rank, config.rank)
    return MemoryState(S=0.3 * jax.random.normal(jax.random.key(seed), shape, jnp.float32))


def test_read_only_leaves_the_state_unchanged():
    model, cfg = _fresh()
    config = deltamem_jax.load_adapter(model, FIXTURES / "tsw" / "adapter")
    state = _random_state(cfg, config)
    logits, mem = _run(model, cfg, state, WriteControl(WriteMode.READ_ONLY))
    chex.assert_shape(mem.S, state.S.shape)
    np.testing.assert_array_equal(mem.S, state.S)
    # and it did read: the logits differ from a zero-state pass
    zero_logits, zero_mem = _run(model, cfg, MemoryState.zeros(cfg.num_layers, B, config), WriteControl(WriteMode.READ_ONLY))
    np.testing.assert_array_equal(zero_mem.S, 0.0)
    assert np.max(np.abs(logits - zero_logits)) > 1e-4


def test_target_layers_only_write_their_layers():
    model, cfg = _fresh()
    assert cfg.num_layers == 2
    config = DeltaMemConfig(target_layers=(1,))
    deltamem_jax.attach(model, config)
    np.testing.assert_array_equal(deltamem_jax.memory_of(model).enabled[...], [False, True])

    _, mem = _run(model, cfg, MemoryState.zeros(cfg.num_layers, B, config), WriteControl(WriteMode.TOKENS))
    chex.assert_shape(mem.S, (2, B, 1, 8, 8))
    np.testing.assert_array_equal(mem.S[0], 0.0)
    assert np.all(np.abs(np.asarray(mem.S[1])).reshape(B, -1).max(-1) > 1e-4)  # every row wrote

    # a disabled layer neither writes nor decays a nonzero state
    state = _random_state(cfg, config)
    _, mem = _run(model, cfg, state, WriteControl(WriteMode.TOKENS))
    np.testing.assert_array_equal(mem.S[0], state.S[0])
    assert np.max(np.abs(mem.S[1] - state.S[1])) > 1e-4


# ------------------------------------------------------------------------ MemoryState


def test_memory_state_zeros_and_reset():
    config = DeltaMemConfig(rank=4, num_state_heads=3)
    z = MemoryState.zeros(2, 3, config)
    chex.assert_shape(z.S, (2, 3, 3, 4, 4))
    chex.assert_type(z.S, jnp.float32)
    assert z.batch == 3
    np.testing.assert_array_equal(z.S, 0.0)

    s = MemoryState(S=1.0 + jax.random.uniform(jax.random.key(0), (2, 3, 3, 4, 4)))
    r = s.reset(jnp.asarray([True, False, True]))
    chex.assert_shape(r.S, s.S.shape)
    np.testing.assert_array_equal(r.S[:, 0], 0.0)
    np.testing.assert_array_equal(r.S[:, 2], 0.0)
    np.testing.assert_array_equal(r.S[:, 1], s.S[:, 1])
    np.testing.assert_array_equal(s.reset(jnp.zeros(3, bool)).S, s.S)
    np.testing.assert_array_equal(s.reset().S, 0.0)
    # a pure pytree: jit-able, one leaf
    assert len(jax.tree.leaves(s)) == 1
    np.testing.assert_array_equal(jax.jit(lambda st, rows: st.reset(rows))(s, jnp.asarray([False, True, False])).S[:, 1], 0.0)
