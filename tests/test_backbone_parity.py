"""Parity of the JAX backbone (`models/`) with transformers' PyTorch models.

Each case builds a tiny random transformers model (float32, eager attention, seeded),
moves its RMSNorm weights away from 1 and its biases away from 0 so that a misplaced
norm or bias shows, saves it with `save_pretrained(safe_serialization=True)`, loads the
folder with `models.load_pretrained` and compares logits:

* a full random batch `[2, 12]`;
* a left-padded batch (position ids = cumsum(mask) − 1, clipped at 0), real positions only;
* an incremental run (prefill 8 tokens, then 4 more through the KV cache, one by one or
  as chunks) against our one-shot forward and against transformers.

The loader's errors (wrong shape, missing or unexpected tensor, unsupported config) are
checked too.
"""

from __future__ import annotations

import dataclasses
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="backbone parity tests need PyTorch (pip install -e '.[torch]')"
)
transformers = pytest.importorskip("transformers", reason="backbone parity tests need transformers")

import models  # noqa: E402
from deltamem_jax.forward import forward  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.decoder import KVCache, rope_frequencies  # noqa: E402
from models.loading import build_decoder  # noqa: E402

pytestmark = pytest.mark.torch

LOGIT_TOL = 1e-4
SELF_TOL = 3e-5  # incremental vs one-shot, both ours (observed ≤ 6e-6 on logits up to ~5)
B, T, PREFILL = 2, 12, 8

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    # Larger than the default 0.02 so that attention is far from uniform: RoPE, masks
    # and q/k norms then change the logits by much more than the tolerance.
    initializer_range=0.15,
)
_LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)

# name -> (config class name, config kwargs)
CASES = {
    "llama": ("LlamaConfig", dict(num_hidden_layers=2, attention_bias=False, tie_word_embeddings=False)),
    "llama_bias": ("LlamaConfig", dict(num_hidden_layers=2, attention_bias=True, mlp_bias=True)),
    "llama_rope_llama3": ("LlamaConfig", dict(num_hidden_layers=2, rope_parameters=dict(rope_theta=10000.0, **_LLAMA3))),
    "llama_tied": ("LlamaConfig", dict(num_hidden_layers=2, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=2, tie_word_embeddings=False)),
    # transformers 5 saves `rope_parameters` (the v5 layout); test_v4_layout covers the old one
    "qwen3": ("Qwen3Config", dict(num_hidden_layers=2, rope_parameters=dict(rope_type="default", rope_theta=1000.0))),
    "smollm3": ("SmolLM3Config", dict(num_hidden_layers=4, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
}
# Checked on the full batch only (each case costs a compile or two).
EXTRA_CASES = {
    "qwen3_attention_bias": ("Qwen3Config", dict(num_hidden_layers=2, attention_bias=True)),  # q, k, v AND o biases
    "smollm3_attention_bias": ("SmolLM3Config", dict(num_hidden_layers=4, attention_bias=True, mlp_bias=True, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
}


def _to_v4_layout(raw: dict) -> dict:
    """transformers-4 style: `rope_theta` at top level, scaling in `rope_scaling`."""
    raw = dict(raw)
    rope = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = rope.pop("rope_theta")
    kind = rope.get("rope_type", "default")
    raw["rope_scaling"] = None if kind == "default" else rope
    return raw


def _perturb(model, seed: int) -> None:
    """Norm weights 1 → 1 ± 0.3, biases 0 → ±0.3 (so that each really matters)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))


def _build(name: str, folder):
    cls_name, kwargs = {**CASES, **EXTRA_CASES}[name]
    config = getattr(transformers, cls_name)(**_COMMON, **kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(sum(map(ord, name)))
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    _perturb(hf, sum(map(ord, name)))
    hf.eval()
    hf.folder = folder
    hf.save_pretrained(folder, safe_serialization=True)
    model, cfg = models.load_pretrained(folder)
    return hf, model, cfg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """name -> (transformers model, our Decoder, ModelConfig), built once per module."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = _build(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get


def _batch(seed: int, padded: bool):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 128, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    if padded:
        mask[0, :5] = 0  # row 0: 5 pad tokens on the left; row 1: none
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
    return tokens, mask, positions


def _hf_logits(hf, tokens, mask, positions) -> np.ndarray:
    with torch.no_grad():
        out = hf(
            input_ids=torch.as_tensor(tokens, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            position_ids=torch.as_tensor(positions, dtype=torch.long),
            use_cache=False,
        )
    return out.logits.float().numpy()


def _ours(model, cfg, tokens, mask, positions) -> np.ndarray:
    cache = KVCache.create(cfg, tokens.shape[0], tokens.shape[1])
    logits, _, _ = forward(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask != 0), cache, attend_cache=False)
    return np.asarray(logits)


def _max_err(a, b, mask=None) -> float:
    err = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    if mask is not None:
        err = np.where(np.asarray(mask, bool)[..., None], err, 0.0)
    return float(err.max())


# ---------------------------------------------------------------------------- config


def test_configs_enable_the_features(checkpoint):
    """The cases really exercise what they are named for."""
    cfg = {n: checkpoint(n)[2] for n in CASES}
    assert not cfg["llama"].qkv_bias and not cfg["llama"].o_bias and not cfg["llama"].tie_word_embeddings
    assert cfg["llama_bias"].qkv_bias and cfg["llama_bias"].o_bias and cfg["llama_bias"].mlp_bias
    assert dict(cfg["llama_rope_llama3"].rope_scaling)["rope_type"] == "llama3"
    assert cfg["llama_tied"].tie_word_embeddings and not hasattr(checkpoint("llama_tied")[1], "lm_head")
    assert cfg["qwen2"].qkv_bias and not cfg["qwen2"].o_bias
    assert cfg["qwen3"].qk_norm and cfg["qwen3"].rope_theta == 1000.0
    assert cfg["smollm3"].rope_layers == (True, True, True, False)
    assert cfg["smollm3"].tie_word_embeddings
    for name in ("llama_rope_llama3", "qwen3"):  # what transformers 5 saved
        assert "rope_parameters" in json.loads((checkpoint(name)[0].folder / "config.json").read_text())


@pytest.mark.parametrize("name", ["llama_rope_llama3", "qwen3", "smollm3"])
def test_v4_layout(checkpoint, name):
    """transformers-4 `rope_theta` + `rope_scaling` gives the same config as the v5 layout."""
    hf, _, cfg = checkpoint(name)
    raw = json.loads((hf.folder / "config.json").read_text())
    assert ModelConfig.from_hf(_to_v4_layout(raw)) == cfg
    if name == "llama_rope_llama3":  # the oldest spelling: "type" instead of "rope_type"
        old = _to_v4_layout(raw)
        old["rope_scaling"] = {("type" if k == "rope_type" else k): v for k, v in old["rope_scaling"].items()}
        parsed = ModelConfig.from_hf(old)
        assert dict(parsed.rope_scaling)["rope_type"] == "llama3"
        np.testing.assert_array_equal(rope_frequencies(parsed), rope_frequencies(cfg))
        assert dataclasses.replace(parsed, rope_scaling=cfg.rope_scaling) == cfg


@pytest.mark.parametrize(
    "name, change",
    [
        ("llama_rope_llama3", dict(rope_scaling=None)),
        ("smollm3", dict(rope_layers=(True,) * 4)),
        ("qwen3", dict(rope_theta=10000.0)),
    ],
)
def test_parity_is_sensitive(checkpoint, name, change):
    """Dropping a feature (llama3 scaling, SmolLM3's NoPE layers, …) breaks parity by far."""
    hf, _, cfg = checkpoint(name)
    tokens, mask, positions = _batch(0, padded=False)
    wrong_cfg = dataclasses.replace(cfg, **change)
    wrong = build_decoder(wrong_cfg, {k: v.numpy() for k, v in hf.state_dict().items()})
    err = _max_err(_ours(wrong, wrong_cfg, tokens, mask, positions), _hf_logits(hf, tokens, mask, positions))
    assert err > 100 * LOGIT_TOL, f"{name}: {change} changes the logits by only {err:.2e}"


# ---------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", list(CASES) + list(EXTRA_CASES))
def test_logits_match_transformers(checkpoint, name):
    hf, model, cfg = checkpoint(name)
    tokens, mask, positions = _batch(1, padded=False)
    expected = _hf_logits(hf, tokens, mask, positions)
    ours = _ours(model, cfg, tokens, mask, positions)
    assert ours.shape == (B, T, 128)
    err = _max_err(ours, expected)
    assert err <= LOGIT_TOL, f"{name}: max abs logit error {err:.3e}"
    assert np.abs(expected).max() > 0.5  # the comparison is not of near-zero logits


@pytest.mark.parametrize("name", list(CASES))
def test_left_padded_batch_matches_transformers(checkpoint, name):
    hf, model, cfg = checkpoint(name)
    tokens, mask, positions = _batch(2, padded=True)
    expected = _hf_logits(hf, tokens, mask, positions)
    ours = _ours(model, cfg, tokens, mask, positions)
    err = _max_err(ours, expected, mask)
    assert err <= LOGIT_TOL, f"{name}: max abs logit error at real positions {err:.3e}"
    # The unpadded row alone gives the same logits as inside the padded batch.
    real = mask[0] != 0
    alone = _hf_logits(hf, tokens[:1, real], mask[:1, real], positions[:1, real])
    assert _max_err(ours[0, real], alone[0]) <= LOGIT_TOL


_STEPS = (PREFILL, 1, 1, 1, 1)
_INCREMENTAL = [
    *((name, _STEPS) for name in ("llama", "llama_rope_llama3", "qwen2", "qwen3", "smollm3")),
    ("smollm3", (PREFILL, 4)),
    ("llama_bias", (5, 3, 4)),
    ("llama_tied", (PREFILL, 4)),
]


@pytest.mark.parametrize(
    "name, chunks", _INCREMENTAL, ids=[f"{n}-{'+'.join(map(str, c))}" for n, c in _INCREMENTAL]
)
def test_incremental_decode_matches_one_shot(checkpoint, name, chunks):
    """Prefill 8 tokens, then 4 more through the KV cache (one by one, or as chunks) ==
    one forward over all 12; both match transformers too."""
    hf, model, cfg = checkpoint(name)
    tokens, mask, positions = _batch(3, padded=True)
    valid = mask != 0
    one_shot = _ours(model, cfg, tokens, mask, positions)

    cache = KVCache.create(cfg, B, T)
    parts, start = [], 0
    for n in chunks:
        sl = slice(start, start + n)
        logits, cache, _ = forward(
            model, jnp.asarray(tokens[:, sl]), jnp.asarray(positions[:, sl]), jnp.asarray(valid[:, sl]), cache, attend_cache=start > 0
        )
        parts.append(np.asarray(logits))
        start += n
    assert start == T
    incremental = np.concatenate(parts, axis=1)
    assert int(cache.end) == T
    np.testing.assert_array_equal(np.asarray(cache.valid), valid)
    err = _max_err(incremental, one_shot, mask)
    assert err <= SELF_TOL, f"{name}: incremental vs one-shot max abs error {err:.3e}"
    err_hf = _max_err(incremental, _hf_logits(hf, tokens, mask, positions), mask)
    assert err_hf <= LOGIT_TOL, f"{name}: incremental vs transformers max abs error {err_hf:.3e}"


# ---------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def llama_tensors(checkpoint):
    hf, _, cfg = checkpoint("llama")
    return cfg, {k: v.numpy().copy() for k, v in hf.state_dict().items()}


def test_build_decoder_from_numpy_matches_load_pretrained(checkpoint, llama_tensors):
    cfg, tensors = llama_tensors
    _, loaded, _ = checkpoint("llama")
    built = build_decoder(cfg, tensors)
    tokens, mask, positions = _batch(4, padded=False)
    np.testing.assert_array_equal(_ours(built, cfg, tokens, mask, positions), _ours(loaded, cfg, tokens, mask, positions))


def test_wrong_shape_names_the_tensor(llama_tensors):
    cfg, tensors = llama_tensors
    name = "model.layers.1.self_attn.k_proj.weight"
    bad = dict(tensors, **{name: np.zeros((cfg.kv_width + 16, cfg.hidden_size), np.float32)})
    with pytest.raises(ValueError, match=re.escape(name)):
        build_decoder(cfg, bad)


def test_missing_tensor_names_the_tensor(llama_tensors):
    cfg, tensors = llama_tensors
    name = "model.layers.0.mlp.up_proj.weight"
    bad = {k: v for k, v in tensors.items() if k != name}
    with pytest.raises(KeyError, match=re.escape(name)):
        build_decoder(cfg, bad)
    bad = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    with pytest.raises(KeyError, match=re.escape("lm_head.weight")):
        build_decoder(cfg, bad)


def test_unexpected_tensor_names_the_tensor(llama_tensors):
    cfg, tensors = llama_tensors
    name = "model.layers.0.self_attn.o_proj.bias"  # this config has no attention bias
    bad = dict(tensors, **{name: np.zeros((cfg.hidden_size,), np.float32)})
    with pytest.raises(ValueError, match=re.escape(name)):
        build_decoder(cfg, bad)
    # a tied config ignores a stored lm_head copy, and a rotary buffer is always ignored
    tied = dataclasses.replace(cfg, tie_word_embeddings=True)
    build_decoder(tied, dict(tensors, **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(8, np.float32)}))


def _hf_raw(**overrides) -> dict:
    raw = dict(
        model_type="llama",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return {**raw, **overrides}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(model_type="mistral"), "unsupported model_type"),
        (dict(model_type="gemma2"), "unsupported model_type"),
        (dict(model_type="qwen2", use_sliding_window=True, sliding_window=4), "sliding"),
        (dict(model_type="qwen3", layer_types=["full_attention", "sliding_attention"], sliding_window=4), "sliding"),
        (dict(model_type="smollm3", use_sliding_window=True, sliding_window=4), "sliding"),
        (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=10000.0)), "yarn"),
        (dict(num_key_value_heads=3), "divisible"),
    ],
)
def test_unsupported_config_raises(overrides, message, tmp_path):
    raw = _hf_raw(**overrides)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message):
        models.load_pretrained(tmp_path)
