"""Sharded prefill/decode on a 4×2 (data × model) mesh of 8 virtual CPU devices equals one device.

JAX fixes its device count at first use, so the sharded run happens in a subprocess that
runs this file as a script (`python tests/test_sharding.py worker`) with 8 host devices;
it prints one JSON line of results that the test checks. The worker compares, against the
same model on one device:

* the frozen backbone's prefill logits and a decode step through the KV cache;
* with δ-mem attached (`output_init="random"`, so the memory changes the logits): prefill
  logits and memory state, then a decode step's logits and memory state.

The rules table itself (`ShardingRules.spec`) is checked in-process on an abstract mesh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TOL = 1e-5
N_DEVICES = 8
DATA, MODEL = 4, 2


# ---------------------------------------------------------------------------- worker


def _worker() -> dict:
    import jax

    jax.config.update("jax_num_cpu_devices", N_DEVICES)
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import deltamem_jax
    import models
    from models.config import ModelConfig
    from models.decoder import KVCache
    from models.sharding import state_shardings

    assert len(jax.devices()) == N_DEVICES, jax.devices()
    # Every model-parallel dimension divides by 2: heads 4, KV heads 2, mlp 128, vocab 256.
    cfg = ModelConfig(
        family="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
        qkv_bias=True, o_bias=True, mlp_bias=True, qk_norm=True,
    )  # fmt: skip
    model = models.Decoder(cfg, nnx.Rngs(0))
    # Random everything (norms around 1, biases around 0), large enough that attention is not uniform.
    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))

    def randomize(path, x):
        name = str(path[-1].key if hasattr(path[-1], "key") else path[-1])
        noise = jax.random.normal(next(keys), x.shape, x.dtype)
        if "norm" in name:
            return 1.0 + 0.2 * noise
        if "bias" in name:
            return 0.2 * noise
        return 0.1 * noise

    nnx.update(model, jax.tree_util.tree_map_with_path(randomize, nnx.to_pure_dict(params)))
    deltamem_jax.attach(model, deltamem_jax.DeltaMemConfig(output_init="random"))
    mem_cfg = deltamem_jax.memory_of(model).config

    b, t = DATA, 16
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
    mask = np.ones((b, t), bool)
    mask[1, :3] = False  # left padding in two rows
    mask[3, :9] = False
    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None).astype(np.int32)
    next_tok = rng.integers(0, cfg.vocab_size, (b, 1)).astype(np.int32)
    next_pos = positions[:, -1:] + 1

    def run(put):
        """put(array, spec) places an input; returns every output as NumPy, plus the raw logits."""
        fwd = deltamem_jax.forward
        out = {}
        x, pos, val = put(tokens, P("data")), put(positions, P("data")), put(mask, P("data"))
        x1, pos1, val1 = put(next_tok, P("data")), put(next_pos, P("data")), put(np.ones((b, 1), bool), P("data"))

        def cache():
            c = KVCache.create(cfg, b, t + 1)
            return KVCache(
                k=put(c.k, P(None, "data")), v=put(c.v, P(None, "data")), valid=put(c.valid, P("data")), end=c.end
            )

        # frozen backbone (memory=None runs it even with δ-mem attached)
        logits, kv, _ = fwd(model, x, pos, val, cache(), attend_cache=False)
        out["backbone_prefill_logits"] = logits
        logits, _, _ = fwd(model, x1, pos1, val1, kv)
        out["backbone_decode_logits"] = logits
        # with δ-mem
        mem = deltamem_jax.MemoryState.zeros(cfg.num_layers, b, mem_cfg)
        mem = deltamem_jax.MemoryState(S=put(mem.S, P(None, "data")))
        write = deltamem_jax.WriteControl()
        logits, kv, mem = fwd(model, x, pos, val, cache(), mem, write, attend_cache=False)
        out["deltamem_prefill_logits"], out["deltamem_prefill_state"] = logits, mem.S
        logits, _, mem = fwd(model, x1, pos1, val1, kv, mem, write)
        out["deltamem_decode_logits"], out["deltamem_decode_state"] = logits, mem.S
        return out

    single = {k: np.asarray(v) for k, v in run(lambda a, spec: jnp.asarray(a)).items()}

    mesh = models.make_mesh(DATA, MODEL)
    models.shard_model(model, mesh)
    sharded_raw = run(lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec)))
    sharded = {k: np.asarray(v) for k, v in sharded_raw.items()}

    attn = model.layers.attn.base
    specs = {
        "q_proj": attn.q_proj[...].sharding.spec,
        "k_proj": attn.k_proj[...].sharding.spec,
        "q_bias": attn.q_bias[...].sharding.spec,
        "o_proj": attn.o_proj[...].sharding.spec,
        "gate_proj": model.layers.mlp.gate_proj[...].sharding.spec,
        "down_proj": model.layers.mlp.down_proj[...].sharding.spec,
        "embed": model.embed[...].sharding.spec,
        "lm_head": model.lm_head[...].sharding.spec,
        "memory_in_proj": deltamem_jax.memory_of(model).in_proj[...].sharding.spec,
        "delta_q": deltamem_jax.memory_of(model).delta_q[...].sharding.spec,
    }
    # state_shardings agrees with where shard_model put the arrays
    _, state = nnx.split(model)
    want = jax.tree.leaves(state_shardings(state, mesh), is_leaf=lambda s: isinstance(s, NamedSharding))
    have = [x.sharding for x in jax.tree.leaves(state)]
    agree = len(want) == len(have) and all(w.is_equivalent_to(h, x.ndim) for w, h, x in zip(want, have, jax.tree.leaves(state)))

    return {
        "devices": len(jax.devices()),
        "errors": {k: float(np.max(np.abs(single[k] - sharded[k]))) for k in single},
        "magnitudes": {k: float(np.max(np.abs(v))) for k, v in single.items()},
        "deltamem_effect": float(np.max(np.abs(single["deltamem_prefill_logits"] - single["backbone_prefill_logits"]))),
        "finite": all(bool(np.isfinite(v).all()) for v in sharded.values()),
        "specs": {k: [None if a is None else str(a) for a in v] for k, v in specs.items()},
        "logit_devices": len(sharded_raw["deltamem_prefill_logits"].sharding.device_set),
        "state_shardings_agree": bool(agree),
    }


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    print("RESULT " + json.dumps(_worker()))
    sys.exit(0)


# ---------------------------------------------------------------------------- tests

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def sharded_run():
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={N_DEVICES}").strip()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "worker"],
        env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"sharded worker failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"no result from the worker:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def test_eight_devices(sharded_run):
    assert sharded_run["devices"] == N_DEVICES


@pytest.mark.parametrize("name", ["backbone_prefill_logits", "backbone_decode_logits"])
def test_backbone_matches_single_device(sharded_run, name):
    err = sharded_run["errors"][name]
    assert err <= TOL, f"{name}: sharded vs single device max abs error {err:.3e}"
    assert sharded_run["magnitudes"][name] > 0.1  # not comparing zeros


@pytest.mark.parametrize(
    "name", ["deltamem_prefill_logits", "deltamem_prefill_state", "deltamem_decode_logits", "deltamem_decode_state"]
)
def test_deltamem_matches_single_device(sharded_run, name):
    err = sharded_run["errors"][name]
    assert err <= TOL, f"{name}: sharded vs single device max abs error {err:.3e}"
    assert sharded_run["magnitudes"][name] > 1e-3  # the memory was written / changes the logits
    assert sharded_run["finite"]


def test_deltamem_changes_the_logits(sharded_run):
    """Not vacuous: the δ-mem logits differ from the backbone's (compared on one device)."""
    # identical logits would make the δ-mem comparisons a repeat of the backbone ones
    assert sharded_run["deltamem_effect"] > 100 * TOL


def test_parameters_really_are_sharded(sharded_run):
    specs = sharded_run["specs"]
    assert specs["q_proj"] == [None, None, "model", None]  # [layers, embed, heads, head_dim]
    assert specs["k_proj"] == [None, None, "model", None]  # KV heads shard too (2 over 2)
    assert specs["q_bias"] == [None, "model", None]
    assert specs["o_proj"] == [None, "model", None, None]
    assert specs["gate_proj"] == [None, None, "model"]
    assert specs["down_proj"] == [None, "model", None]
    assert specs["embed"] == ["model", None]  # vocab
    assert specs["lm_head"] == [None, "model"]
    assert "model" not in specs["memory_in_proj"]  # the memory stays whole
    assert specs["delta_q"] == [None, None, "model", None]  # [layers, R, heads, head_dim]
    assert sharded_run["logit_devices"] == N_DEVICES
    assert sharded_run["state_shardings_agree"]


def test_rules_spec():
    """Divisible axes map to their mesh axis, others stay replicated; a mesh axis is used once."""
    from jax.sharding import AbstractMesh
    from jax.sharding import PartitionSpec as P

    from models.sharding import ShardingRules

    mesh = AbstractMesh((DATA, MODEL), ("data", "model"))
    rules = ShardingRules()
    assert rules.spec(("layers", "embed", "heads", "head_dim"), (2, 64, 4, 16), mesh) == P(None, None, "model", None)
    assert rules.spec(("vocab", "embed"), (255, 64), mesh) == P(None, None)  # 255 % 2 != 0
    assert rules.spec(("heads", "kv_heads"), (4, 2), mesh) == P("model", None)  # "model" once
    assert rules.spec(("batch", "vocab"), (4, 256), mesh) == P("data", "model")
    assert rules.spec((None, "mlp"), (3, 128), mesh) == P(None, "model")
