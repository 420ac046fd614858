"""DeltaMemConfig: reading the official `delta_mem_config.json`, refusing what we do not implement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltamem_jax.config import (
    _ARCHIVED_DEFAULTS,
    _OFFICIAL_DEFAULTS,
    DeltaMemConfig,
    OutputInit,
    UpdateMode,
    WriteGranularity,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official_tiny"


def _raw(scenario: str) -> dict:
    return json.loads((FIXTURES / scenario / "adapter" / "delta_mem_config.json").read_text())


@pytest.mark.parametrize(
    "scenario, heads, granularity",
    [
        ("tsw", 1, WriteGranularity.TOKEN),
        ("ssw", 1, WriteGranularity.MESSAGE_MEAN),
        ("msw", 4, WriteGranularity.TOKEN),
        ("tsw_padded", 1, WriteGranularity.TOKEN),
    ],
)
def test_fixture_configs(scenario, heads, granularity):
    c = DeltaMemConfig.from_official(_raw(scenario))
    assert c.rank == 8
    assert c.num_state_heads == heads
    assert c.width == 8 * heads
    assert c.write_granularity == granularity
    assert c.branches == ("q", "o")
    assert c.target_layers == ()
    assert c.output_init == OutputInit.BASE_SLICE_FIXED
    assert c.update_mode == UpdateMode.STANDARD
    assert c.alpha == 16.0 and c.scale == 2.0
    assert c.couple_lambda and c.normalize_qk and c.rankwise_gates
    assert c.num_gates == c.width
    # the same through the file loader, given the folder or the file
    assert DeltaMemConfig.load(FIXTURES / scenario / "adapter") == c
    assert DeltaMemConfig.load(FIXTURES / scenario / "adapter" / "delta_mem_config.json") == c


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_memory_partitions", 2),
        ("memory_readout_mode", "latent"),
        ("delta_o_rmsnorm", True),
        ("latent_memory_layers", [0, 1]),
        ("target_modules", ["self_attn", "mlp"]),
        ("trainable_delta_scale", True),
    ],
)
def test_archived_field_with_non_default_value_is_refused(field, value):
    raw = {**_raw("tsw"), field: value}
    with pytest.raises(ValueError, match=field):
        DeltaMemConfig.from_official(raw)


def test_archived_fields_at_their_defaults_are_accepted():
    # tuples vs lists must not matter
    raw = {**_raw("tsw"), **{k: tuple(v) if isinstance(v, list) else v for k, v in _ARCHIVED_DEFAULTS.items()}}
    assert DeltaMemConfig.from_official(raw) == DeltaMemConfig.from_official(_raw("tsw"))


def test_unknown_field_is_refused():
    with pytest.raises(ValueError, match="memory_bananas"):
        DeltaMemConfig.from_official({**_raw("tsw"), "memory_bananas": 3})


def test_load_names_the_file(tmp_path):
    (tmp_path / "delta_mem_config.json").write_text(json.dumps({"memory_bananas": 3}))
    with pytest.raises(ValueError, match="delta_mem_config.json.*memory_bananas"):
        DeltaMemConfig.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        DeltaMemConfig.load(tmp_path / "nowhere")


def test_missing_fields_take_official_defaults():
    c = DeltaMemConfig.from_official({})
    assert c.output_init == OutputInit.ZERO  # the official default, not ours
    assert c.branches == ("q", "k", "v", "o")
    assert c.rank == 8 and c.alpha == 16.0 and c.num_state_heads == 1
    assert c.write_granularity == WriteGranularity.TOKEN
    assert c.update_mode == UpdateMode.STANDARD
    assert c.beta_bias_init == -1.5 and c.online_gain == 0.05 and c.base_slice_width == 8
    assert c.target_layers == ()
    # only some given: the rest still defaults
    c = DeltaMemConfig.from_official({"rank": 4, "delta_heads": ["q"]})
    assert c.rank == 4 and c.branches == ("q",) and c.output_init == OutputInit.ZERO


def test_our_defaults_differ_from_official_defaults():
    ours = DeltaMemConfig()
    assert ours.output_init == OutputInit.BASE_SLICE_FIXED
    assert ours.branches == ("q", "o")
    assert _OFFICIAL_DEFAULTS["output_init"] == "zero"


@pytest.mark.parametrize(
    "heads, expected",
    [
        ("q,o", ("q", "o")),
        (" Q , O ", ("q", "o")),
        (["o", "q", "o"], ("o", "q")),
        (["q", "none"], ("q",)),
        ("none", ()),
    ],
)
def test_delta_heads_forms(heads, expected):
    assert DeltaMemConfig.from_official({"delta_heads": heads}).branches == expected


@pytest.mark.parametrize("heads", [["q", "x"], "q,gate", ["qk"]])
def test_invalid_branch_is_refused(heads):
    with pytest.raises(ValueError, match="branches"):
        DeltaMemConfig.from_official({"delta_heads": heads})
    with pytest.raises(ValueError):
        DeltaMemConfig(branches=tuple(heads) if isinstance(heads, list) else (heads,))


def test_duplicate_branch_in_constructor_is_refused():
    with pytest.raises(ValueError, match="branches"):
        DeltaMemConfig(branches=("q", "q"))


@pytest.mark.parametrize(
    "field, value",
    [("write_granularity", "sentence"), ("update_mode", "bogus"), ("output_init", "ones"), ("rank", 0), ("num_state_heads", 0)],
)
def test_invalid_values_are_refused(field, value):
    with pytest.raises(ValueError):
        DeltaMemConfig(**{field: value})


@pytest.mark.parametrize(
    "config",
    [
        DeltaMemConfig(),
        DeltaMemConfig(
            rank=4,
            alpha=8.0,
            num_state_heads=4,
            write_granularity="message_mean",
            update_mode="lambda_outside",
            couple_lambda=False,
            normalize_qk=False,
            rankwise_gates=False,
            branches=("k", "v"),
            target_layers=(0, 2),
            output_init="random",
            online_gain=0.1,
            base_slice_width=4,
            beta_bias_init=-2.0,
        ),
        DeltaMemConfig(update_mode="no_lambda", output_init="base_slice", branches=("q", "k", "v", "o")),
        DeltaMemConfig(output_init="zero", branches=()),
    ],
)
def test_official_round_trip(config, tmp_path):
    raw = config.to_official()
    assert set(raw) == set(_OFFICIAL_DEFAULTS) | set(_ARCHIVED_DEFAULTS)
    assert DeltaMemConfig.from_official(raw) == config
    # through JSON too (tuples become lists, enums their values)
    (tmp_path / "delta_mem_config.json").write_text(json.dumps(raw))
    assert DeltaMemConfig.load(tmp_path) == config


def test_fixture_config_round_trips_to_the_same_official_dict():
    raw = _raw("msw")
    assert DeltaMemConfig.from_official(raw).to_official() == raw


def test_layer_enabled():
    assert DeltaMemConfig().layer_enabled(3) == [True, True, True]
    assert DeltaMemConfig(target_layers=(1,)).layer_enabled(3) == [False, True, False]
    assert DeltaMemConfig(target_layers=(0, 2)).layer_enabled(3) == [True, False, True]


@pytest.mark.parametrize("targets", [(2,), (0, 5), (-1,)])
def test_layer_enabled_out_of_range(targets):
    with pytest.raises(ValueError, match="target_layers"):
        DeltaMemConfig(target_layers=targets).layer_enabled(2)


def test_derived_sizes():
    c = DeltaMemConfig(rank=4, num_state_heads=3, rankwise_gates=False, alpha=6.0)
    assert c.width == 12 and c.num_gates == 3 and c.scale == 1.5
    assert DeltaMemConfig(rank=4, num_state_heads=3).num_gates == 12


# ---------------------------------------------------------------- ModelConfig (backbone config.json)

_TINY_HF = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
_LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)


def _v4_layout(raw: dict, old_spelling: bool = False) -> dict:
    """transformers-4 style: `rope_theta` at the top, scaling in `rope_scaling` (oldest: `type`)."""
    raw = dict(raw)
    rope = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = rope.pop("rope_theta")
    if old_spelling:
        rope["type"] = rope.pop("rope_type")
    raw["rope_scaling"] = None if rope.get("rope_type", rope.get("type")) == "default" else rope
    return raw


@pytest.mark.parametrize(
    "model_type, rope",
    [
        ("llama", dict(rope_type="default", rope_theta=500000.0)),
        ("llama", dict(rope_theta=10000.0, **_LLAMA3_ROPE)),
        ("llama", dict(rope_type="linear", factor=2.0, rope_theta=10000.0)),
        ("qwen2", dict(rope_type="default", rope_theta=1000000.0)),
        ("qwen3", dict(rope_type="default", rope_theta=1000.0)),
        ("smollm3", dict(rope_type="default", rope_theta=2000000.0)),
    ],
)
def test_model_config_v4_and_v5_forms_agree(model_type, rope):
    from models.config import ModelConfig, import_transformers

    v5 = import_transformers().AutoConfig.for_model(model_type, rope_parameters=rope, **_TINY_HF).to_dict()
    assert "rope_parameters" in v5  # what transformers 5 saves
    cfg = ModelConfig.from_hf(v5)
    assert cfg.family == model_type and cfg.rope_theta == rope["rope_theta"]
    kind = rope["rope_type"]
    assert cfg.rope_scaling == (None if kind == "default" else tuple(sorted((k, v) for k, v in rope.items() if k != "rope_theta")))
    assert ModelConfig.from_hf(_v4_layout(v5)) == cfg
    assert ModelConfig.from_hf(_v4_layout(v5, old_spelling=True)) == cfg
    # a transformers config object is read the same as its dict
    assert ModelConfig.from_hf(import_transformers().AutoConfig.for_model(**v5)) == cfg


def test_model_config_defaults_per_model_type():
    """Fields a config.json leaves out take transformers' default for that model type."""
    from models.config import ModelConfig

    cfg = {t: ModelConfig.from_hf(dict(model_type=t, **_TINY_HF)) for t in ("llama", "qwen2", "qwen3", "smollm3")}
    assert cfg["llama"].max_position_embeddings == 2048 and cfg["llama"].rope_theta == 10000.0
    assert cfg["qwen2"].qkv_bias and not cfg["qwen2"].o_bias and cfg["qwen2"].head_dim == 16
    assert cfg["qwen3"].head_dim == 128 and cfg["qwen3"].qk_norm and cfg["qwen3"].max_position_embeddings == 32768
    s = cfg["smollm3"]
    assert s.rope_theta == 2000000.0 and s.tie_word_embeddings and s.rope_layers == (True, True, True, False)
    assert ModelConfig.from_hf(dict(model_type="smollm3", no_rope_layers=[1, 0, 1, 1], **_TINY_HF)).rope_layers == (True, False, True, True)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(model_type="mistral"), r"unsupported model_type 'mistral'; supported: llama, qwen2, qwen3, smollm3"),
        (dict(model_type="not-a-model"), "unsupported model_type 'not-a-model'"),
        (dict(model_type=None), "unsupported model_type None"),
        (dict(model_type="qwen2", use_sliding_window=True, sliding_window=4), "sliding"),
        (dict(model_type="qwen3", num_hidden_layers=2, layer_types=["full_attention", "sliding_attention"], sliding_window=4), "sliding"),
        (dict(model_type="llama", rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=10000.0)), "yarn"),
        (dict(model_type="llama", rope_theta=10000.0, rope_scaling=dict(type="dynamic", factor=2.0)), "dynamic"),
        (dict(model_type="llama", num_key_value_heads=3), "divisible"),
    ],
)
def test_model_config_refuses(overrides, message, tmp_path):
    from models.config import ModelConfig

    raw = {**_TINY_HF, **overrides}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message):
        ModelConfig.load(tmp_path)
