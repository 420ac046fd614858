"""Two processes of four CPU devices each, one 4×2 mesh over both, equal one process.

The processes talk over localhost through JAX's own multi-controller runtime
(`jax.distributed.initialize`) with gloo CPU collectives, as hosts of a TPU pod or a GPU
cluster would. Each runs `sharded_cases.run` on the global mesh (the data axis spans the
two processes, the model axis stays within one): parameters created sharded, a prefill and
a decode loop with δ-mem, four micro-steps of the train step. Each process builds only its
own rows of every batch. The results, gathered, must equal a single-process run on one
device (`test_sharding.py reference`). The `generate` command with the distributed flags
is run the same way, on a tiny Llama folder.
"""

from __future__ import annotations

import json
import re
import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOL = 1e-5
PROCESSES, LOCAL_DEVICES = 2, 4
DATA, MODEL = 4, 2


def _worker(process_id: int, port: int, out: str) -> dict:
    import jax

    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=PROCESSES, process_id=process_id)
    sys.path.insert(0, str(HERE))
    import numpy as np
    import sharded_cases

    import models

    assert jax.process_count() == PROCESSES and len(jax.devices()) == PROCESSES * LOCAL_DEVICES
    mesh = models.make_mesh(DATA, MODEL)
    result = sharded_cases.run(mesh)
    if process_id == 0:
        np.savez(out, **result["values"])
    report = {
        "process": jax.process_index(),
        "local_devices": len(jax.local_devices()),
        "rows_built": sharded_cases.ROWS_BUILT,
        "same_sharding": result["same_sharding"],
        "specs": result["specs"],
    }
    jax.distributed.shutdown()
    return report


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    print("RESULT " + json.dumps(_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])), flush=True)
    sys.exit(0)


# ---------------------------------------------------------------------------- tests

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from test_sharding import single_device_reference, worker_result  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("multiprocess")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    single = single_device_reference(tmp_path_factory)  # one process, one device (shared with test_sharding.py)
    # two processes over localhost
    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "worker", str(i), str(port), str(tmp / "sharded.npz")],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE.parent)  # fmt: skip
        for i in range(PROCESSES)
    ]
    reports = []
    try:
        for i, p in enumerate(procs):
            stdout, stderr = p.communicate(timeout=600)
            reports.append(worker_result(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr), f"process {i}"))
    finally:
        for p in procs:  # only the workers started here
            if p.poll() is None:
                p.kill()
    return {"single": single, "sharded": dict(np.load(tmp / "sharded.npz")), "reports": reports}


def test_two_processes_form_one_mesh(runs):
    assert [r["process"] for r in runs["reports"]] == list(range(PROCESSES))
    assert all(r["local_devices"] == LOCAL_DEVICES for r in runs["reports"])


def test_two_processes_equal_one(runs):
    """Prefill, decode loop, gradients and updated parameters equal one process on one device."""
    single, sharded = runs["single"], runs["sharded"]
    assert set(single) == set(sharded)
    assert any(k.startswith("grad") for k in single) and "decode_memory" in single
    for name, want in single.items():
        have = sharded[name]
        assert have.shape == want.shape and np.isfinite(have).all(), name
        err = float(np.max(np.abs(have.astype(np.float64) - want)))
        assert err <= TOL, f"{name}: two processes vs one differ by {err:.3e}"


def test_each_process_builds_only_its_rows(runs):
    """The data axis runs across the processes: process i renders rows [4i, 4i+4) only."""
    rows = 8 // PROCESSES
    for r in runs["reports"]:
        i = r["process"]
        assert sorted(map(tuple, r["rows_built"])) == [("prompt", rows * i, rows), ("train", rows * i, rows)]


def test_state_keeps_its_sharding_across_processes(runs):
    for r in runs["reports"]:
        assert r["same_sharding"] == {"prefill": True, "decode": True, "params_after_steps": True, "opt_state_after_steps": True}
        assert r["specs"]["memory_state"] == [None, "data", None, None, None]
        assert r["specs"]["delta_q"] == [None, None, "model", None]

# What gloo's C++ side writes to stdout when the processes connect, piece by piece
# ("[Gloo] Rank ", 0, " is connected to ", 1, " peer ranks. ", "Expected number …", 1): its
# threads interleave the pieces, and other output splits them across lines anywhere.
_GLOO_PIECES = re.compile(r"\[Gloo\] Rank| is connected to| peer ranks\.|Expected number of connected peer ranks is :")


def _without_gloo(stdout: str) -> list[str]:
    """The non-blank lines of `stdout` once gloo's pieces are cut out, less the lines that only
    their numbers are left on. Runs here printed "[Gloo] Rank 3 is connected to [Gloo] Rank 3
    peer ranks. Expected …", "[Gloo] Rank 0[Gloo] Rank 1 is connected to …", a bare newline."""
    lines = _GLOO_PIECES.sub("", stdout).splitlines()
    return [line for line in lines if line.strip() and not re.fullmatch(r"[\d\s]+", line)]


def test_gloo_pieces_are_cut_whatever_their_interleaving():
    reply = "> Name a colour.\n\u00e9t\u00e9 2.\n"
    for noise in ["[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n",
                  "[Gloo] Rank 0[Gloo] Rank 1 is connected to 3 peer ranks. Expected number of connected peer ranks is : 3\n",
                  "[Gloo] Rank 3 is connected to [Gloo] Rank 3 peer ranks. Expected number of connected peer ranks is : 3\n\n"]:
        assert _without_gloo(noise + reply) == ["> Name a colour.", "\u00e9t\u00e9 2."]


def test_generate_command_on_two_processes_equals_one(tmp_path):
    """`deltamem-jax generate --coordinator … --mesh 4x2` on two processes (a tiny Llama
    folder as users bring them, sharded from each host's copy) prints what one process
    prints. (The real SmolLM2 would take minutes here for the same plumbing.)"""
    from test_hf_folders import _save_family

    folder = _save_family(tmp_path, "llama")
    prompts = ["Name a colour.", "What is the capital of France?"]
    base = [sys.executable, "-m", "deltamem_jax.cli", "generate", *prompts, "--model", str(folder), "--max-new-tokens", "4"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    one = subprocess.run(base, env=env, capture_output=True, text=True, timeout=600, cwd=HERE.parent)
    assert one.returncode == 0, one.stderr[-4000:]
    port = _free_port()
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={LOCAL_DEVICES}").strip()
    flags = ["--mesh", f"{DATA}x{MODEL}", "--coordinator", f"localhost:{port}", "--num-processes", str(PROCESSES)]
    procs = [subprocess.Popen(base + flags + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=HERE.parent) for i in range(PROCESSES)]  # fmt: skip
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    assert "sharded over a 4×2 mesh" in outs[0][1]
    assert _without_gloo(outs[0][0]) == _without_gloo(one.stdout) and one.stdout.count("> ") == len(prompts)  # process 0 prints the same replies
    assert _without_gloo(outs[1][0]) == []  # the other process prints nothing
