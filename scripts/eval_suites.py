"""Recall suites: passkey retrieval (depths × history lengths, memory-only, histories
beyond the context window included), multi-fact saturation and fact updates, with plots.

See `deltamem_jax/evaluation/suites.py`. Usage:
  python scripts/eval_suites.py --json out.json --plots docs/plots
  python scripts/eval_suites.py --relations door_code,locker,birthday,appointment --facts 1,2,3,4 --json out.json
  python scripts/eval_suites.py --lengths 256,1024 --depths 0.5 --trials 1 --facts 1,2 --episodes 8 --updates 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def plot(summary: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    pk = summary.get("passkey")
    if pk:
        fig, ax = plt.subplots(figsize=(6, 4))
        depths = sorted({g["depth"] for g in pk["grid"]})
        for d in depths:
            rows = [g for g in pk["grid"] if g["depth"] == d]
            ax.plot([g["history_tokens"] for g in rows], [g["accuracy"] for g in rows], marker="o", label=f"depth {d}")
        ax.axhline(pk["control_accuracy"], color="gray", ls="--", label="empty memory")
        ax.set(xscale="log", xlabel="history tokens (written memory-only)", ylabel="passkey accuracy", ylim=(-0.05, 1.05), title="passkey retrieval")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "suite_passkey.png", dpi=110)
        plt.close(fig)
        written.append(str(folder / "suite_passkey.png"))
    facts = summary.get("facts")
    if facts:
        n = [int(k) for k in facts]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(n, [facts[str(k)]["accuracy"] for k in n], marker="o", label="own memory")
        ax.plot(n, [facts[str(k)]["mismatched"] for k in n], marker="s", label="another episode's memory")
        ax.set(xlabel="facts told", ylabel="accuracy", ylim=(-0.05, 1.05), title="multi-fact recall (memory-only)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "suite_facts.png", dpi=110)
        plt.close(fig)
        written.append(str(folder / "suite_facts.png"))
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", help="δ-mem adapter folder (default: the shipped one)")
    p.add_argument("--model", help="HF folder or .gguf (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--lengths", default="256,1024,4096,16384", help="passkey history lengths in tokens")
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--trials", type=int, default=3, help="passkey trials per (length, depth)")
    p.add_argument("--facts", default="1,2,4,6,8", help="fact counts for the saturation suite")
    p.add_argument("--episodes", type=int, default=40, help="episodes per fact count")
    p.add_argument("--updates", type=int, default=60, help="update episodes")
    p.add_argument("--relations", default="", help="relation kinds of the facts and updates suites (default: all), e.g. door_code,locker")
    p.add_argument("--json", help="summary (and records) output")
    p.add_argument("--plots", default="docs/plots", help="folder for the PNG plots")
    a = p.parse_args(argv)

    from deltamem_jax.adapter import adapter_identity, load_adapter
    from deltamem_jax.cli import load_backbone
    from deltamem_jax.evaluation.suites import run_facts, run_passkey, run_updates, summarize_suites
    from deltamem_jax.session import DEFAULT_ADAPTER
    from deltamem_jax.training.data import parse_relations

    t0 = time.perf_counter()
    model, tok = load_backbone(a.model)
    adapter = a.adapter or str(DEFAULT_ADAPTER)
    load_adapter(model, adapter)
    log = lambda s: print(f"[{time.perf_counter() - t0:6.0f} s] {s}", flush=True)  # noqa: E731
    relations = parse_relations(a.relations)
    records = []
    if a.trials:
        records += run_passkey(model, tok, [int(x) for x in a.lengths.split(",")], [float(x) for x in a.depths.split(",")], a.trials, log=log)
    if a.episodes:
        records += run_facts(model, tok, [int(x) for x in a.facts.split(",")], a.episodes, log=log, relations=relations)
    if a.updates:
        records += run_updates(model, tok, a.updates, log=log, relations=relations)
    command = " ".join(["python scripts/eval_suites.py", *(sys.argv[1:] if argv is None else argv)])
    summary = {"command": command, "adapter": adapter, "adapter_identity": adapter_identity(adapter), "relations": list(relations) or "all", "seconds": time.perf_counter() - t0,
               **summarize_suites(records)}  # fmt: skip
    summary["plots"] = plot(summary, Path(a.plots))
    print(json.dumps({k: v for k, v in summary.items() if k != "plots"}, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps({**summary, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
