"""Parity with the official PyTorch δ-mem (declare-lab/delta-Mem) on its own tiny fixtures.

The fixtures (`tests/fixtures/official_tiny/`, see its README) hold the official code's
inputs and outputs on tiny random Qwen3 backbones; `scripts/check_official_parity.py`
replays them through this port. Here we run it in-process on every scenario, and once as
a command-line tool (exit code 0 on a match, 1 on a corrupted expectation).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_official_parity.py"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official_tiny"

FULL = {
    "prefill_logits",
    "state_after_prefill",
    "decode_logits",
    "state_after_decode",
    "read_logits",
    "state_after_read",
    "read_logits_zero_state",
}
EXPECTED_ARRAYS = {
    "tsw": FULL,
    "ssw": FULL,
    "msw": FULL,
    "tsw_padded": {"prefill_logits", "state_after_prefill", "unpadded_row1_logits", "unpadded_row1_state"},
}


def _load_script():
    spec = importlib.util.spec_from_file_location("check_official_parity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def parity():
    return _load_script()


@pytest.mark.parametrize("writer", ["scan", "chunked"])
@pytest.mark.parametrize("scenario", sorted(EXPECTED_ARRAYS))
def test_matches_official(parity, scenario, writer):
    results = parity.run(FIXTURES / scenario, writer)
    names = [name for name, _, _ in results]
    assert len(names) == len(set(names)), f"an array was compared twice: {names}"
    assert set(names) == EXPECTED_ARRAYS[scenario]
    for name, err, tol in results:
        want = parity.LOGIT_TOL if "logits" in name else parity.STATE_TOL
        assert tol == want, f"{name}: tolerance {tol}, expected {want}"
        assert np.isfinite(err) and err <= tol, f"{scenario}/{name}: max abs err {err:.3e} > {tol:.0e}"


def test_cli_pass_and_fail(tmp_path):
    """Exit 0 and PASS on a fixture; exit 1 and FAIL once its expected logits are off by 1e-2."""
    scenario = "tsw_padded"
    bad = tmp_path / scenario
    shutil.copytree(FIXTURES / scenario, bad)
    exp = dict(np.load(bad / "expected.npz"))
    exp["prefill_logits"] = exp["prefill_logits"] + 1e-2
    np.savez(bad / "expected.npz", **exp)

    # the second run reuses the first one's compiled programs (same shapes, other numbers)
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }

    def cli(folder):
        return subprocess.run(
            [sys.executable, str(SCRIPT), "--fixture", str(folder)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    good = cli(FIXTURES / scenario)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "PASS" in good.stdout and "FAIL" not in good.stdout, good.stdout
    assert "(4 arrays)" in good.stdout, good.stdout

    failed = cli(bad)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "FAIL" in failed.stdout, failed.stdout
    lines = [line for line in failed.stdout.splitlines() if "max abs err" in line and line.rstrip().endswith("FAIL")]
    assert [line.split()[0] for line in lines] == ["prefill_logits"], failed.stdout


def test_cli_missing_parts(parity, tmp_path, capsys):
    """A folder without backbone/adapter/expected.npz is a usage error (exit 2), not a crash."""
    assert parity.main(["--fixture", str(tmp_path)]) == 2
    assert "backbone" in capsys.readouterr().err
