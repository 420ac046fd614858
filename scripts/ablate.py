"""Ablation sweep: train a short adapter per value of one training flag, then measure each
the same way (the held-out recall probe and greedy memory-only vs mismatched accuracy).

Every run is an ordinary training run folder under `--root` (rerun to resume), so a sweep
continues after an interruption. Flags after `--` go to every training run.

Usage:
  python scripts/ablate.py --sweep rank=4,8,16 --json out.json -- --steps 60 --batch-size 8 --max-facts 1 --max-chitchat 0
  python scripts/ablate.py --sweep layers=all,first,middle,last -- --steps 60
  python scripts/ablate.py --sweep sub-states=1,4 ...   # TSW vs MSW;  granularity=token,message_mean: SSW
  python scripts/ablate.py --sweep update-mode=standard,no_lambda,lambda_outside ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(adapter: Path, episodes: int, max_facts: int, log) -> dict:
    import numpy as np

    from deltamem_jax.adapter import load_adapter
    from deltamem_jax.cli import load_backbone
    from deltamem_jax.evaluation.recall import RecallEvaluator, correct
    from deltamem_jax.training.batches import Layout, Renderer
    from deltamem_jax.training.data import EpisodeConfig
    from deltamem_jax.training.data import episodes as make

    model, tok = load_backbone(None)
    load_adapter(model, adapter)
    cfg = EpisodeConfig(min_facts=1, max_facts=max_facts, max_chitchat=0, update_rate=0.0, never_said_rate=0.0)
    ev = RecallEvaluator(model, tok, renderer=Renderer(tok, Layout(max_turns=cfg.max_turns)))
    eps = make(1234, "eval", 0, episodes, cfg)
    out = {"memory_only": [], "mismatched_memory": []}
    for i in range(0, episodes, 25):
        chunk = eps[i : i + 25]
        ans = ev.answers(chunk, tuple(out))
        for c in out:
            out[c] += [correct(r, e) for r, e in zip(ans[c], chunk)]
    acc = {c: float(np.mean(v)) for c, v in out.items()}
    log(f"{adapter}: memory_only {acc['memory_only']:.3f}, mismatched {acc['mismatched_memory']:.3f}")
    return acc


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", required=True, help="FLAG=V1,V2,...: a training flag (without --) and its values")
    p.add_argument("--root", default="runs/ablate", help="folder of the sweep's run folders")
    p.add_argument("--eval-episodes", type=int, default=50, help="held-out episodes for the greedy accuracies")
    p.add_argument("--json", help="summary output")
    p.add_argument("--plot", default="docs/plots/ablation.png")
    a = p.parse_args(own)
    flag, _, values = a.sweep.partition("=")
    if not values:
        p.error("--sweep needs FLAG=V1,V2,...")

    from deltamem_jax.training.cli import add_arguments, run

    train_parser = argparse.ArgumentParser(prog="train")
    add_arguments(train_parser)
    t0 = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - t0:6.0f} s] {s}", flush=True)  # noqa: E731
    results = []
    for value in values.split(","):
        out = Path(a.root) / f"{flag}-{value}"
        args = train_parser.parse_args(passthrough + [f"--{flag}", value, "--out", str(out)])
        log(f"training {out}")
        run(args)
        probes = [json.loads(line)["eval"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
        max_facts = args.max_facts
        acc = measure(out / "adapter", a.eval_episodes, max_facts, log)
        results.append({"flag": flag, "value": value, "run": str(out), "probe": probes[-1] if probes else None, **acc})
    summary = {"sweep": a.sweep, "train_args": passthrough, "eval_episodes": a.eval_episodes, "results": results, "seconds": time.perf_counter() - t0}
    print(json.dumps(summary, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(results))
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].bar(x - 0.2, [r["memory_only"] for r in results], 0.4, label="memory-only")
    ax[0].bar(x + 0.2, [r["mismatched_memory"] for r in results], 0.4, label="mismatched memory")
    ax[0].set(xticks=x, xticklabels=[r["value"] for r in results], xlabel=flag, ylabel="held-out accuracy", title="greedy recall")
    ax[0].legend()
    if all(r["probe"] for r in results):
        ax[1].bar(x, [r["probe"]["other"] - r["probe"]["matched"] for r in results])
        ax[1].set(xticks=x, xticklabels=[r["value"] for r in results], xlabel=flag, ylabel="other − matched answer CE (nats)", title="recall probe gap")
    fig.tight_layout()
    Path(a.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.plot, dpi=110)
    log(f"plot written to {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
