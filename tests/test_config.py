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
