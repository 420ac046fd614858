"""Regenerates the measured-results block of `docs/RESULTS.md` from the JSON results.

Reads (each optional; missing ones are reported as not yet run):
  docs/runs/locomo*.json     python scripts/eval_locomo.py --json ... (locomo_full.json first)
  docs/runs/suites.json      python scripts/eval_suites.py --json ...
  docs/runs/ablation*.json   python scripts/ablate.py --json ...
and rewrites the text between `<!-- report:begin -->` and `<!-- report:end -->` in
`docs/RESULTS.md` (the hand-written narrative around it stays), plus the LoCoMo plot.
Every table names the file (and so the command) it comes from.

Usage: python scripts/make_report.py [--results docs/RESULTS.md] [--runs docs/runs]
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, when run as a script

BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"
CATEGORIES = ("multi-hop", "temporal", "open-domain", "single-hop", "adversarial")
PAPER = "paper (δ-mem on Qwen3-4B): 1.20× over the frozen backbone in protocol (b); memory-only F1 6.89 → 9.62"


def _rel(path: str) -> str:
    """A path inside this repository relative to its root (results name adapters absolutely)."""
    root = Path(__file__).resolve().parents[1]
    p = Path(path)
    return str(p.relative_to(root)) if p.is_absolute() and p.is_relative_to(root) else path


@functools.cache
def _shipped_sha256() -> str | None:
    """sha256 of the shipped adapter's weights (hashed once per report)."""
    from deltamem_jax.adapter import adapter_identity
    from deltamem_jax.session import DEFAULT_ADAPTER

    return adapter_identity(DEFAULT_ADAPTER)["sha256"] if (DEFAULT_ADAPTER / "delta_mem_config.json").is_file() else None


def _adapter(s: dict) -> str:
    """The adapter a result was measured with: its folder, and whether its weights are the
    ones shipped now (a result file names the folder; the weights there change between stages)."""
    ident = s.get("adapter_identity")
    if not ident:
        return f"adapter `{_rel(s['adapter'])}` (its weights are not recorded in this file: possibly an earlier default)"
    shipped = _shipped_sha256()
    run = re.search(r"--out (\S+)", ident.get("command", ""))
    trained = f", trained {ident['steps']} steps as `{run.group(1)}`" if run else ""
    which = "the adapter shipped now" if ident["sha256"] == shipped else "not the adapter shipped now"
    return f"adapter `{_rel(ident['path'])}` (weights sha256 {ident['sha256'][:12]}…, {which}{trained})"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def locomo_section(path: Path, plots: Path) -> list[str]:
    """One LoCoMo summary (`eval_locomo.py --json`) as a table and a per-category plot named after the file."""
    s = json.loads(path.read_text())
    protos = s["protocols"]
    plot = f"{path.stem}_categories.png"
    lines = [f"From `{path}`: conversations {', '.join(s['conversations'])}, categories {s['categories']}, "
             f"max questions per conversation {s['max_questions']}, {s['sampling']}, {_adapter(s)}, {s['seconds'] / 60:.0f} min."
             + (f" Command: `{s['command']}`." if "command" in s else "")
             + ("" if s.get("complete", True) else f" **Partial run** (it resumes when rerun): the questions every protocol has answered so far, "
                f"from {', '.join(s['conversations_answered'])}."), "",
             "| protocol | " + " | ".join(CATEGORIES) + " | F1 (1–4) | questions | ÷ frozen |", "|---|" + "---:|" * (len(CATEGORIES) + 3)]  # fmt: skip
    frozen = protos.get("frozen", {}).get("f1")
    control = protos.get("no_history", {}).get("f1")
    for name, p in protos.items():
        cells = [_pct(p["per_category"].get(c, {}).get("f1")) for c in CATEGORIES]
        base = control if name == "memory_only" else frozen
        ratio = f"{p['f1'] / base:.2f}×" if base and p["f1"] is not None and name not in ("frozen", "no_history") else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_pct(p['f1'])} | {p['questions']} | {ratio} |")
    lines += ["", f"Ratios: official and window_memory ÷ frozen; memory_only ÷ no_history (its control). For comparison, the {PAPER}.", ""]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        fig, ax = plt.subplots(figsize=(9, 4))
        width = 0.8 / len(protos)
        for i, (name, p) in enumerate(protos.items()):
            ax.bar(np.arange(len(CATEGORIES)) + i * width, [100 * (p["per_category"].get(c, {}).get("f1") or 0) for c in CATEGORIES], width, label=name)
        ax.set(xticks=np.arange(len(CATEGORIES)) + 0.4 - width / 2, xticklabels=CATEGORIES, ylabel="F1 (%)", title="LoCoMo per category")
        ax.legend()
        fig.tight_layout()
        plots.mkdir(parents=True, exist_ok=True)
        fig.savefig(plots / plot, dpi=110)
        plt.close(fig)
        lines += [f"![LoCoMo per category]({Path('plots') / plot})", ""]
    except ImportError:
        lines += ["(matplotlib not installed: no plot)", ""]
    return lines


def suites_section(path: Path) -> list[str]:
    if not path.is_file():
        return ["### Recall suites", "", f"Not yet run (`python scripts/eval_suites.py --json {path}`).", ""]
    s = json.loads(path.read_text())
    lines = ["### Recall suites", "", f"From `{path}` ({_adapter(s)}, relation kinds of the facts and updates suites: "
             f"{', '.join(s['relations']) if isinstance(s.get('relations'), list) else 'all'}, {s['seconds'] / 60:.0f} min)."
             + (f" Command: `{s['command']}`." if "command" in s else ""), ""]  # fmt: skip
    pk = s.get("passkey")
    if pk:
        lines += [f"Passkey (memory-only): accuracy {pk['accuracy']:.2f}, empty-memory control {pk['control_accuracy']:.2f}.", "",
                  "| history tokens | " + " | ".join(f"depth {d}" for d in pk["by_depth"]) + " |", "|---:|" + "---:|" * len(pk["by_depth"])]  # fmt: skip
        for n in pk["by_length"]:
            row = [g["accuracy"] for g in pk["grid"] if str(g["history_tokens"]) == n]
            lines.append(f"| {n} | " + " | ".join(f"{x:.2f}" for x in row) + " |")
        lines += ["", "![passkey](plots/suite_passkey.png)", ""]
    facts = s.get("facts")
    if facts:
        lines += ["| facts told | own memory | another episode's memory | episodes |", "|---:|---:|---:|---:|"]
        lines += [f"| {n} | {v['accuracy']:.2f} | {v['mismatched']:.2f} | {v['n']} |" for n, v in facts.items()]
        lines += ["", "![facts](plots/suite_facts.png)", ""]
    up = s.get("updates")
    if up:
        lines += [f"Updates ({up['n']} episodes): later value {up['later_value']:.2f}, old value given {up['old_value']:.2f}, "
                  f"later value with another episode's memory {up['mismatched']:.2f}.", ""]  # fmt: skip
    return lines


def ablation_section(paths: list[Path]) -> list[str]:
    if not paths:
        return ["### Ablations", "", "Not yet run (`python scripts/ablate.py --sweep FLAG=V1,V2 --json docs/runs/ablation_FLAG.json -- TRAIN FLAGS`).", ""]
    lines = ["### Ablations", ""]
    for path in paths:
        s = json.loads(path.read_text())
        lines += [f"From `{path}`: sweep `{s['sweep']}`, training flags `{' '.join(s['train_args'])}`, {s['eval_episodes']} held-out episodes.", "",
                  "| value | memory-only | mismatched | probe matched | probe other | gap |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in s["results"]:
            p = r["probe"] or {}
            gap = p["other"] - p["matched"] if p else None
            lines.append(f"| {r['value']} | {r['memory_only']:.3f} | {r['mismatched_memory']:.3f} | {p.get('matched', float('nan')):.3f} | "
                         f"{p.get('other', float('nan')):.3f} | {'–' if gap is None else f'{gap:+.3f}'} |")  # fmt: skip
        lines += ["", "![ablation](plots/ablation.png)", ""]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="docs/RESULTS.md")
    p.add_argument("--runs", default="docs/runs")
    a = p.parse_args(argv)
    results, runs = Path(a.results), Path(a.runs)
    block = [BEGIN, "", "## Benchmarks (generated by `python scripts/make_report.py`)", ""]
    # the full run (locomo_full.json) first, then any smaller ones
    locomo = sorted(runs.glob("locomo*.json"), key=lambda p: (p.stem != "locomo_full", p.name))
    block += ["### LoCoMo", ""]
    for path in locomo:
        block += locomo_section(path, results.parent / "plots")
    if not locomo:
        block += [f"Not yet run (`python scripts/eval_locomo.py --json {runs / 'locomo_full.json'}`).", ""]
    block += suites_section(runs / "suites.json")
    block += ablation_section(sorted(runs.glob("ablation*.json")))
    block.append(END)
    text = results.read_text() if results.is_file() else "# Results\n\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + "\n".join(block) + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(block) + "\n"
    results.write_text(text)
    print(f"rewrote the generated block of {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
