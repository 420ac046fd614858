"""Held-out recall in cross-entropy by distance: does the memory keep a fact for later turns?

Greedy accuracy is 0 until recall is strong; the value tokens' cross-entropy shows it
earlier. For episodes of exactly `--facts` facts (session protocol, no chit-chat), grouped
by how many turns after the asked fact the question comes, this prints the answer-value
cross-entropy with the episode's own memory and with another episode's (the mismatched
control) for each adapter. The gap other − matched is recall; a gate that wipes the
memory every turn leaves a gap only at distance 0.

    python scripts/probe_distance.py --facts 3 --episodes 16 ADAPTER [ADAPTER ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time

import deltamem_jax._xla_flags  # noqa: F401  (before JAX starts)
import jax
import jax.numpy as jnp

from deltamem_jax.adapter import load_adapter
from deltamem_jax.cli import load_backbone
from deltamem_jax.training.batches import Layout, Renderer
from deltamem_jax.training.data import EpisodeConfig, episodes
from deltamem_jax.training.step import make_recall_probe, split_model


def by_distance(facts: int, per_bucket: int, seed: int) -> dict[int, list]:
    """`per_bucket` held-out episodes for each distance 0..facts−1 (turns after the asked fact)."""
    config = EpisodeConfig(min_facts=facts, max_facts=facts, max_chitchat=0, update_rate=0.0, never_said_rate=0.0)
    buckets: dict[int, list] = {d: [] for d in range(facts)}
    index = 0
    while any(len(b) < per_bucket for b in buckets.values()):
        for e in episodes(seed, "eval", index, 64, config):
            if len(buckets[e.turns_ago]) < per_bucket:
                buckets[e.turns_ago].append(e)
        index += 64
    return buckets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapters", nargs="+")
    p.add_argument("--facts", type=int, default=3)
    p.add_argument("--episodes", type=int, default=16, help="per distance (at least 2: the control rolls the batch)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", help="write the table here")
    a = p.parse_args(argv)
    _, tok = load_backbone()
    buckets = by_distance(a.facts, a.episodes, a.seed)
    renderer = Renderer(tok, Layout(max_turns=a.facts))
    batches = {d: jax.tree.map(jnp.asarray, renderer.batch(eps, "session")) for d, eps in buckets.items()}
    results = {}
    for path in a.adapters:
        t0 = time.perf_counter()
        model, _ = load_backbone()  # a fresh backbone per adapter
        load_adapter(model, path)
        graphdef, params, frozen = split_model(model)
        probe = make_recall_probe(graphdef)
        rows = {}
        for d, batch in batches.items():
            m = {k: float(v) for k, v in probe(params, frozen, batch).items()}
            rows[d] = {"value_matched": m["value_matched"], "value_other": m["value_other"], "value_empty": m["value_empty"],
                       "gap": m["value_other"] - m["value_matched"]}  # fmt: skip
        results[path] = rows
        print(f"{path} ({time.perf_counter() - t0:.0f} s): value-token CE, {a.facts} facts, {a.episodes} episodes per distance")
        print("  turns after the fact | own memory | another's | gap (recall)")
        for d, r in rows.items():
            print(f"  {d:>20} | {r['value_matched']:10.3f} | {r['value_other']:9.3f} | {r['gap']:+.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"facts": a.facts, "episodes_per_distance": a.episodes, "seed": a.seed, "adapters": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
