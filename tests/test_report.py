"""`scripts/make_report.py` rewrites only its generated block, shows every LoCoMo summary
(the full run first), flags a partial run and names the commands."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
make_report = importlib.import_module("make_report")


def locomo_summary(f1: dict[str, float], complete: bool, command: str) -> dict:
    per = {p: {"f1": v, "per_category": {"single-hop": {"f1": v, "questions": 4}}, "questions": 4} for p, v in f1.items()}
    return {"command": command, "data": "x.json", "adapter": "a", "sampling": "greedy", "conversations": ["conv-1", "conv-2"],
            "categories": [1, 2, 3, 4], "max_questions": None, "seconds": 120.0, "complete": complete,
            "conversations_answered": ["conv-1"], "protocols": per}  # fmt: skip


def test_report_block(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    full = locomo_summary({"frozen": 0.10, "official": 0.12, "memory_only": 0.03, "no_history": 0.02}, False, "python scripts/eval_locomo.py --greedy")
    (runs / "locomo_full.json").write_text(json.dumps(full))
    (runs / "locomo.json").write_text(json.dumps(locomo_summary({"frozen": 0.2}, True, "python scripts/eval_locomo.py --conversations 1")))
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# R\n\nhand-written\n\n{make_report.BEGIN}\nold\n{make_report.END}\n\ntail\n")

    assert make_report.main(["--results", str(results), "--runs", str(runs)]) == 0
    text = results.read_text()
    assert text.startswith("# R\n\nhand-written") and text.endswith("tail\n") and "\nold\n" not in text
    assert text.index("locomo_full.json") < text.index("locomo.json`")  # the full run first
    assert "**Partial run**" in text and "from conv-1." in text and "`python scripts/eval_locomo.py --greedy`" in text
    assert "| official | – | – | – | 12.00 | – | 12.00 | 4 | 1.20× |" in text
    assert "| memory_only | – | – | – | 3.00 | – | 3.00 | 4 | 1.50× |" in text  # ÷ its no-history control
    assert "Recall suites" in text and "Not yet run" in text
    assert "adapter `a` (its weights are not recorded in this file" in text  # results without an adapter identity


def test_report_says_whether_a_result_used_the_shipped_adapter():
    from deltamem_jax.adapter import adapter_identity
    from deltamem_jax.session import DEFAULT_ADAPTER

    shipped = adapter_identity(DEFAULT_ADAPTER)
    other = dict(shipped, sha256="0" * 64, path="runs/old/adapter")
    assert make_report._adapter({"adapter": "x", "adapter_identity": shipped}).count("the adapter shipped now") == 1
    assert "not the adapter shipped now" in make_report._adapter({"adapter": "x", "adapter_identity": other})
