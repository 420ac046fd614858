"""Grows a trained adapter's rank (TSW/SSW), keeping what it learned, as a start for training.

The widened adapter computes what the old one did, plus small writes into the new state
rows (`--noise`), so a run started from it (`scripts/train.py --init-adapter OUT --rank R`)
can put the extra capacity to use without relearning the rest (`deltamem_jax.widen_rank`).

    python scripts/widen_adapter.py --adapter docs/runs/cpu-stage9/adapter --rank 16 --out runs/rank16-init   (stage 10's start)
"""

from __future__ import annotations

import argparse

from deltamem_jax.adapter import load_adapter, save_adapter, widen_rank
from deltamem_jax.cli import load_backbone


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", required=True, help="the trained adapter folder")
    p.add_argument("--rank", type=int, required=True, help="the new rank")
    p.add_argument("--out", required=True, help="where the widened adapter folder goes")
    p.add_argument("--model", help="HF folder or GGUF file the adapter belongs to (default: embedded SmolLM2)")
    p.add_argument("--noise", type=float, default=0.1, help="new key/query/value columns: this × the trained ones' spread")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    model, _ = load_backbone(a.model)
    old = load_adapter(model, a.adapter)
    new = widen_rank(model, a.rank, noise=a.noise, seed=a.seed)
    save_adapter(model, a.out)
    print(f"{a.adapter}: rank {old.rank} → {new.rank} (old corrections × {old.scale / new.scale:g}, so α/rank × W_Δ is kept), written to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
