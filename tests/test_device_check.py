"""`scripts/device_check.py --tiny` runs on any machine and prints its whole table.

The full check is for a GPU or TPU machine; this keeps the script itself from rotting."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_tiny_prints_its_table():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_check.py"), "--tiny"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("device: ") and "TINY" in lines[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ") and not line.startswith("| check")]
    checks = [r[0] for r in rows]
    assert checks == ["tests", "decode", "decode", "prefill", "prefill", "write", "write", "write", "write", "train"]
    for check, setting, result in rows[1:]:
        rate = re.fullmatch(r"([\d,]+) tokens/s", result)
        assert rate and int(rate.group(1).replace(",", "")) > 0, (check, setting, result)
