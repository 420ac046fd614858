"""Attaching δ-mem, its initialization, and the official adapter folder format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import deltamem_jax
from deltamem_jax import DeltaMemConfig, MemoryParam, MemoryState, WriteControl, WriteMode, forward
from deltamem_jax.adapter import CONFIG_FILE, SAFETENSORS_FILE, TORCH_FILE
from deltamem_jax.memory import DeltaMemAttention
from models import Attention, Decoder, KVCache, ModelConfig, build_decoder, load_pretrained
from models.loading import weight_table

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official_tiny"
BRANCH_SUFFIXES = {b: f"delta_{b}_proj" for b in "qkvo"}


def _backbone(scenario: str = "tsw"):
    return load_pretrained(FIXTURES / scenario / "backbone")


def _flat(state) -> dict[str, np.ndarray]:
    """{'a/b/c': array} of an nnx State."""
    out = {}

    def walk(tree, prefix):
        for k, v in tree.items():
            path = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, dict):
                walk(v, path)
            else:
                out[path] = np.asarray(v)

    walk(nnx.to_pure_dict(state), "")
    return out


def _memory_params(model) -> dict[str, np.ndarray]:
    return _flat(nnx.state(model, MemoryParam))


def _fixture_tensors(scenario: str) -> dict[str, np.ndarray]:
    return load_file(str(FIXTURES / scenario / "adapter" / SAFETENSORS_FILE))


def _used_names(tensors: dict, config: DeltaMemConfig) -> dict[str, tuple]:
    """Fixture tensor names/shapes, minus the correction heads of branches the config leaves out."""
    skip = tuple(BRANCH_SUFFIXES[b] for b in "qkvo" if b not in config.branches)
    return {k: tuple(v.shape) for k, v in tensors.items() if not k.endswith(skip)}


def _copy_adapter(scenario: str, dest: Path) -> Path:
    shutil.copytree(FIXTURES / scenario / "adapter", dest)
    return dest


def _other_backbone(**changes) -> Decoder:
    """A random backbone from the fixture's HF config with some fields changed (HF-named arrays → build_decoder)."""
    raw = json.loads((FIXTURES / "msw" / "backbone" / "config.json").read_text())
    raw.update(changes)
    cfg = ModelConfig.from_hf(raw)
    rng = np.random.default_rng(0)
    tensors = {}
    for hf_name, _, _ in weight_table(cfg):
        names = [hf_name.format(i=i) for i in range(cfg.num_layers)] if "{i}" in hf_name else [hf_name]
        for name in names:
            tensors[name] = rng.normal(0.0, 0.05, _torch_shape(name, cfg)).astype(np.float32)
    return build_decoder(cfg, tensors)


def _torch_shape(name: str, cfg: ModelConfig) -> tuple:
    d, q, kv, f, v = cfg.hidden_size, cfg.q_width, cfg.kv_width, cfg.intermediate_size, cfg.vocab_size
    shapes = {
        "embed_tokens.weight": (v, d),
        "lm_head.weight": (v, d),
        "q_proj.weight": (q, d),
        "k_proj.weight": (kv, d),
        "v_proj.weight": (kv, d),
        "o_proj.weight": (d, q),
        "q_norm.weight": (cfg.head_dim,),
        "k_norm.weight": (cfg.head_dim,),
        "gate_proj.weight": (f, d),
        "up_proj.weight": (f, d),
        "down_proj.weight": (d, f),
        "norm.weight": (d,),  # model.norm, input_layernorm, post_attention_layernorm
    }
    for suffix, shape in shapes.items():
        if name.endswith(suffix):
            return shape
    raise AssertionError(name)


def _run(model, cfg, state, control=WriteControl(WriteMode.TOKENS), b=2, t=6):
    tokens = jax.random.randint(jax.random.key(1), (b, t), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = jnp.ones((b, t), bool)
    logits, _, mem = forward(model, tokens, positions, valid, KVCache.create(cfg, b, t), state, control, attend_cache=False)
    return np.asarray(logits), mem


# ------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("scenario", ["tsw", "msw"])
def test_save_load_round_trip(scenario, tmp_path):
    model, _ = _backbone(scenario)
    config = deltamem_jax.load_adapter(model, FIXTURES / scenario / "adapter")
    assert config == DeltaMemConfig.load(FIXTURES / scenario / "adapter")
    out = deltamem_jax.save_adapter(model, tmp_path / "saved")
    assert out == tmp_path / "saved"
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, SAFETENSORS_FILE])

    # tensor names and shapes: the fixture's, for the branches its config corrects
    fixture = _fixture_tensors(scenario)
    saved = load_file(str(out / SAFETENSORS_FILE))
    assert {k: tuple(v.shape) for k, v in saved.items()} == _used_names(fixture, config)
    for name, arr in saved.items():
        assert arr.dtype == np.float32
        np.testing.assert_array_equal(arr, fixture[name], err_msg=name)  # a pure relayout: exact

    # the config file round-trips
    assert DeltaMemConfig.load(out) == config
    assert json.loads((out / CONFIG_FILE).read_text()) == config.to_official()

    # loading what we saved into a fresh backbone gives the same parameters
    fresh, _ = _backbone(scenario)
    assert deltamem_jax.load_adapter(fresh, out) == config
    a, b = _memory_params(model), _memory_params(fresh)
    assert set(a) == set(b) and a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_load_adapter_replaces_an_attached_memory():
    model, _ = _backbone("tsw")
    deltamem_jax.attach(model, DeltaMemConfig(output_init="zero", branches=("k",)))
    deltamem_jax.load_adapter(model, FIXTURES / "tsw" / "adapter")
    assert isinstance(model.layers.attn.base, Attention)  # not a δ-mem wrapped twice
    assert deltamem_jax.memory_of(model).config.branches == ("q", "o")


def test_load_accepts_peft_prefix(tmp_path):
    folder = _copy_adapter("tsw", tmp_path / "a")
    tensors = load_file(str(folder / SAFETENSORS_FILE))
    save_file({f"base_model.{k}": v for k, v in tensors.items()}, str(folder / SAFETENSORS_FILE))
    model, _ = _backbone("tsw")
    deltamem_jax.load_adapter(model, folder)
    ref, _ = _backbone("tsw")
    deltamem_jax.load_adapter(ref, FIXTURES / "tsw" / "adapter")
    a, b = _memory_params(model), _memory_params(ref)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------------ mismatches


@pytest.mark.parametrize(
    "changes, pattern",
    [
        # hidden 32 instead of 64: the first tensor that reads the hidden state is named, with both shapes
        (
            {"hidden_size": 32},
            r"model\.layers\.0\.self_attn\.memory_q_proj has shape \(32, 64\).*\(32, 32\).*hidden 32",
        ),
        # 2 query heads: the q correction no longer fits
        ({"num_attention_heads": 2}, r"model\.layers\.0\.self_attn\.delta_q_proj has shape \(64, 32\).*\(32, 32\)"),
        ({"num_hidden_layers": 1, "layer_types": ["full_attention"]}, r"layers \[0\]\.\.\[1\].*backbone has 1 layers"),
        ({"num_hidden_layers": 3, "layer_types": ["full_attention"] * 3}, r"holds layers \[0, 1\].*targets \[0, 1, 2\] of 3"),
    ],
)
def test_backbone_mismatch_is_a_clear_error(tmp_path, changes, pattern):
    model = _other_backbone(**changes)
    before = model.layers.attn
    with pytest.raises(ValueError, match=pattern):
        deltamem_jax.load_adapter(model, FIXTURES / "msw" / "adapter")
    # a failed load leaves the model as it was
    assert model.layers.attn is before and isinstance(before, Attention)


def _corrupt(tmp_path, edit):
    folder = _copy_adapter("msw", tmp_path / "bad")
    tensors = load_file(str(folder / SAFETENSORS_FILE))
    edit(tensors)
    save_file(tensors, str(folder / SAFETENSORS_FILE))
    return folder


P = "model.layers.1.self_attn."


@pytest.mark.parametrize(
    "edit, pattern",
    [
        # rank 4 rows instead of 8 × 4 sub-states
        (lambda t: t.update({P + "memory_k_proj": t[P + "memory_k_proj"][:16]}), r"memory_k_proj has shape \(16, 64\).*\(32, 64\)"),
        # a wrong number of dimensions
        (lambda t: t.update({P + "beta_bias": t[P + "beta_bias"][:, None]}), r"beta_bias has shape \(32, 1\).*\(32,\)"),
        (lambda t: t.update({P + "delta_o_proj": t[P + "delta_o_proj"].reshape(64, 4, 8)}), r"delta_o_proj has shape \(64, 4, 8\)"),
        (lambda t: t.pop(P + "delta_q_proj"), r"missing model\.layers\.1\.self_attn\.delta_q_proj"),
        (lambda t: t.update({P + "lambda_proj": np.zeros((32, 64), np.float32)}), r"unexpected.*lambda_proj"),
    ],
)
def test_bad_tensor_is_a_clear_error(tmp_path, edit, pattern):
    folder = _corrupt(tmp_path, edit)
    model, _ = _backbone("msw")
    before = model.layers.attn
    with pytest.raises(ValueError, match=pattern):
        deltamem_jax.load_adapter(model, folder)
    assert model.layers.attn is before


def test_failed_load_keeps_the_previous_adapter(tmp_path):
    folder = _corrupt(tmp_path, lambda t: t.pop(P + "beta_proj"))
    model, _ = _backbone("msw")
    deltamem_jax.load_adapter(model, FIXTURES / "msw" / "adapter")
    attn, before = model.layers.attn, _memory_params(model)
    with pytest.raises(ValueError, match="beta_proj"):
        deltamem_jax.load_adapter(model, folder)
    assert model.layers.attn is attn
    after = _memory_params(model)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def test_config_tensor_mismatch_is_a_clear_error(tmp_path):
    """A config that says 1 sub-state over tensors of 4: the widths disagree."""
    folder = _copy_adapter("msw", tmp_path / "bad")
    raw = json.loads((folder / CONFIG_FILE).read_text())
    raw["num_state_heads"] = 1
    (folder / CONFIG_FILE).write_text(json.dumps(raw))
    model, _ = _backbone("msw")
    with pytest.raises(ValueError, match=r"memory_q_proj has shape \(32, 64\).*\(8, 64\).*rank 8 × 1 sub-states"):
        deltamem_jax.load_adapter(model, folder)


def test_no_tensor_file(tmp_path):
    folder = _copy_adapter("tsw", tmp_path / "a")
    (folder / SAFETENSORS_FILE).unlink()
    model, _ = _backbone("tsw")
    with pytest.raises(FileNotFoundError, match="delta_mem_adapter"):
        deltamem_jax.load_adapter(model, folder)


# ------------------------------------------------------------------------ atomic save


def test_save_replaces_atomically(tmp_path, monkeypatch):
    model, _ = _backbone("tsw")
    deltamem_jax.load_adapter(model, FIXTURES / "tsw" / "adapter")
    root = tmp_path / "runs" / "deep"  # parents are created
    target = root / "adapter"
    deltamem_jax.save_adapter(model, target)
    (target / "stale.bin").write_bytes(b"old")
    (target / CONFIG_FILE).write_text("{}")

    deltamem_jax.save_adapter(model, target)
    assert sorted(p.name for p in target.iterdir()) == sorted([CONFIG_FILE, SAFETENSORS_FILE])
    assert DeltaMemConfig.load(target) == deltamem_jax.memory_of(model).config
    assert [p.name for p in root.iterdir()] == ["adapter"]  # no temp or .old folders left

    # a save that fails half-way leaves the old folder intact and nothing behind
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    import safetensors.numpy

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        deltamem_jax.save_adapter(model, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in root.iterdir()] == ["adapter"]


def test_save_needs_a_memory(tmp_path):
    model, _ = _backbone("tsw")
    with pytest.raises(ValueError, match="no δ-mem"):
        deltamem_jax.save_adapter(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------ .pt route


def test_torch_pt_adapter(tmp_path):
    torch = pytest.importorskip("torch")
    folder = tmp_path / "pt"
    folder.mkdir()
    shutil.copy(FIXTURES / "msw" / "adapter" / CONFIG_FILE, folder / CONFIG_FILE)
    tensors = _fixture_tensors("msw")
    torch.save({k: torch.from_numpy(v.copy()) for k, v in tensors.items()}, folder / TORCH_FILE)
    assert not (folder / SAFETENSORS_FILE).exists()

    model, _ = _backbone("msw")
    deltamem_jax.load_adapter(model, folder)
    ref, _ = _backbone("msw")
    deltamem_jax.load_adapter(ref, FIXTURES / "msw" / "adapter")
    a, b = _memory_params(model), _memory_params(ref)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------------ attach / detach


def test_attach_zero_init_equals_backbone_and_detach_restores():
    model, cfg = _backbone("tsw")
    base = model.layers.attn
    plain, _ = _run(model, cfg, None)

    config = DeltaMemConfig(output_init="zero")
    assert deltamem_jax.attach(model, config) is model
    assert isinstance(model.layers.attn, DeltaMemAttention) and model.layers.attn.base is base
    mem = deltamem_jax.memory_of(model)
    for b in config.branches:
        np.testing.assert_array_equal(getattr(mem, f"delta_{b}")[...], 0.0)

    state = MemoryState(S=0.5 * jax.random.normal(jax.random.key(0), (cfg.num_layers, 2, 1, 8, 8)))
    logits, new = _run(model, cfg, state)
    np.testing.assert_allclose(logits, plain, atol=1e-6, rtol=0)
    assert np.max(np.abs(np.asarray(new.S) - np.asarray(state.S))) > 1e-4  # it did write

    with pytest.raises(ValueError, match="already"):
        deltamem_jax.attach(model, config)

    assert deltamem_jax.detach(model) is model
    assert model.layers.attn is base
    np.testing.assert_array_equal(_run(model, cfg, None)[0], plain)
    with pytest.raises(ValueError, match="no δ-mem"):
        deltamem_jax.memory_of(model)
    deltamem_jax.detach(model)  # a no-op on a plain backbone
    assert model.layers.attn is base
    deltamem_jax.attach(model, config)  # and it can be attached again


def test_attach_refuses_out_of_range_layers():
    model, _ = _backbone("tsw")
    base = model.layers.attn
    with pytest.raises(ValueError, match="target_layers"):
        deltamem_jax.attach(model, DeltaMemConfig(target_layers=(2,)))
    assert model.layers.attn is base


@pytest.mark.parametrize("branches", [("q", "o"), ("q", "k", "v", "o"), ("v",)])
def test_split_memory_params(branches):
    model, _ = _backbone("tsw")
    backbone_paths = set(_flat(nnx.state(model)))
    deltamem_jax.attach(model, DeltaMemConfig(branches=branches))
    graphdef, mem, rest = nnx.split(model, MemoryParam, ...)
    m = _flat(mem)
    prefix = "layers/attn/memory/"
    assert set(m) == {prefix + n for n in ("in_proj", "gate_bias", *(f"delta_{b}" for b in branches))}
    assert all(type(v) is MemoryParam for v in jax.tree.leaves(mem, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    r = _flat(rest)
    assert not set(r) & set(m)
    # every backbone weight stays in the rest (now under attn/base), plus the layer mask
    moved = {p.replace("layers/attn/", "layers/attn/base/") for p in backbone_paths}
    assert set(r) == moved | {prefix + "enabled"}
    assert nnx.merge(graphdef, mem, rest).layers.attn.memory.config.branches == branches


# ------------------------------------------------------------------------ init rules


def _torch_base(scenario="tsw") -> dict[str, np.ndarray]:
    return load_file(str(FIXTURES / scenario / "backbone" / "model.safetensors"))


@pytest.mark.parametrize(
    "config, rows",
    [
        (DeltaMemConfig(), 8),  # R = 8
        (DeltaMemConfig(rank=4, num_state_heads=4, branches=("q", "k", "v", "o")), 8),  # R = 16: first 8 rows
        (DeltaMemConfig(rank=4), 4),  # R = 4 < width
        (DeltaMemConfig(base_slice_width=3, online_gain=0.2, num_state_heads=2), 3),
        (DeltaMemConfig(output_init="base_slice", rank=4, num_state_heads=4, branches=("q", "k", "v", "o")), 16),
    ],
)
def test_base_slice_init(config, rows):
    model, cfg = _backbone("tsw")
    deltamem_jax.attach(model, config)
    mem = deltamem_jax.memory_of(model)
    W = _torch_base()
    R = config.width
    for b in config.branches:
        got = np.asarray(getattr(mem, f"delta_{b}")[...]).reshape(cfg.num_layers, R, -1)  # [l, R, out]
        for i in range(cfg.num_layers):
            w = W[f"model.layers.{i}.self_attn.{b}_proj.weight"]  # torch [out, in]
            assert got.shape[2] == w.shape[0]
            cols = w[:, :rows].T  # column j = input feature j
            want = config.online_gain * cols / np.linalg.norm(cols, axis=1, keepdims=True)
            np.testing.assert_allclose(got[i, :rows], want, rtol=1e-5, atol=1e-7, err_msg=f"delta_{b} layer {i}")
            np.testing.assert_array_equal(got[i, rows:], 0.0)
    _check_gates(mem, config, cfg)


def _check_gates(mem, config, cfg):
    R, G = config.width, config.num_gates
    w = np.asarray(mem.in_proj[...])
    sets = 1 if config.couple_lambda or config.update_mode.value == "no_lambda" else 2
    assert w.shape == (cfg.num_layers, cfg.hidden_size, 3 * R + G * sets)
    np.testing.assert_array_equal(w[..., 3 * R :], 0.0)  # β (and λ) projections start at zero
    qkv = w[..., : 3 * R]
    assert np.all(np.abs(qkv) <= 1.0 / np.sqrt(cfg.hidden_size)) and np.std(qkv) > 0.1 / np.sqrt(cfg.hidden_size)
    bias = np.asarray(mem.gate_bias[...])
    np.testing.assert_array_equal(bias[:, :G], config.beta_bias_init)
    if sets == 2:
        np.testing.assert_array_equal(bias[:, G:], -config.beta_bias_init)


@pytest.mark.parametrize(
    "config",
    [
        DeltaMemConfig(output_init="zero", branches=("q", "k", "v", "o")),
        DeltaMemConfig(output_init="random", online_gain=0.1, num_state_heads=2, rankwise_gates=False),
        DeltaMemConfig(couple_lambda=False, beta_bias_init=-2.0),
    ],
)
def test_other_inits(config):
    model, cfg = _backbone("tsw")
    deltamem_jax.attach(model, config)
    mem = deltamem_jax.memory_of(model)
    _check_gates(mem, config, cfg)
    for b in config.branches:
        d = np.asarray(getattr(mem, f"delta_{b}")[...])
        if config.output_init.value == "zero":
            np.testing.assert_array_equal(d, 0.0)
        elif config.output_init.value == "random":
            bound = config.online_gain / np.sqrt(config.width)
            assert np.all(np.abs(d) <= bound) and np.std(d) > 0.2 * bound


def test_attach_seed():
    a, _ = _backbone("tsw")
    b, _ = _backbone("tsw")
    c, _ = _backbone("tsw")
    deltamem_jax.attach(a, DeltaMemConfig(), seed=3)
    deltamem_jax.attach(b, DeltaMemConfig(), seed=3)
    deltamem_jax.attach(c, DeltaMemConfig(), seed=4)
    pa, pb, pc = _memory_params(a), _memory_params(b), _memory_params(c)
    key = "layers/attn/memory/in_proj"
    np.testing.assert_array_equal(pa[key], pb[key])
    assert not np.array_equal(pa[key], pc[key])


# ------------------------------------------------------------------------ widening the rank


def test_widen_rank_keeps_what_the_memory_computes(tmp_path):
    """With no noise the widened memory computes exactly what the trained one did (the old
    state is the new one's top-left block, the new rows stay zero); with noise the new rows
    are written and the logits move a little; the result saves and loads as a rank-r' adapter."""
    model, cfg = _backbone("tsw")
    old = deltamem_jax.load_adapter(model, FIXTURES / "tsw" / "adapter")
    r = old.rank
    logits, state = _run(model, cfg, MemoryState.zeros(cfg.num_layers, 2, old))

    new = deltamem_jax.widen_rank(model, 2 * r, noise=0.0)
    assert new.rank == 2 * r and new.scale == old.scale / 2 and new.branches == old.branches
    wide_logits, wide = _run(model, cfg, MemoryState.zeros(cfg.num_layers, 2, new))
    assert wide.S.shape == (cfg.num_layers, 2, 1, 2 * r, 2 * r)
    np.testing.assert_allclose(wide_logits, logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(wide.S)[..., :r, :r], np.asarray(state.S), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(np.asarray(wide.S)[..., r:, :], 0.0)
    np.testing.assert_array_equal(np.asarray(wide.S)[..., :, r:], 0.0)

    model, _ = _backbone("tsw")
    deltamem_jax.load_adapter(model, FIXTURES / "tsw" / "adapter")
    deltamem_jax.widen_rank(model, r + 4, noise=0.1, seed=1)
    noisy_logits, noisy = _run(model, cfg, MemoryState.zeros(cfg.num_layers, 2, deltamem_jax.memory_of(model).config))
    assert np.max(np.abs(np.asarray(noisy.S)[..., r:, :])) > 1e-4  # the new rows are written
    np.testing.assert_allclose(noisy_logits, logits, atol=0.05 * np.abs(logits).max(), rtol=0)

    out = deltamem_jax.save_adapter(model, tmp_path / "wide")
    fresh, _ = _backbone("tsw")
    assert deltamem_jax.load_adapter(fresh, out).rank == r + 4
    np.testing.assert_array_equal(_run(fresh, cfg, MemoryState.zeros(cfg.num_layers, 2, deltamem_jax.memory_of(fresh).config))[0], noisy_logits)


def test_widen_rank_refuses_what_it_cannot_grow():
    model, _ = _backbone("msw")
    config = deltamem_jax.load_adapter(model, FIXTURES / "msw" / "adapter")
    with pytest.raises(ValueError, match="sub-states"):
        deltamem_jax.widen_rank(model, 2 * config.rank)
    model, _ = _backbone("tsw")
    config = deltamem_jax.load_adapter(model, FIXTURES / "tsw" / "adapter")
    with pytest.raises(ValueError, match="rank above"):
        deltamem_jax.widen_rank(model, config.rank)
