#!/usr/bin/env python
"""Recall of told facts on held-out episodes, five conditions, plus the perplexity ratio.

See `deltamem_jax/evaluation/recall.py` for the conditions and the scoring. Episodes are
the `eval` split (values and phrasings never seen in training), seed `--seed`.

Usage:
  python scripts/eval_recall.py --json out.json                # 200 episodes, default adapter
  python scripts/eval_recall.py --limit 40 --adapter runs/x/adapter --json out.json
  python scripts/eval_recall.py --relations door_code,locker,birthday,appointment --json out.json  # a subset of kinds
  python scripts/eval_recall.py --mesh 4x2 --json out.json     # the model sharded over 8 devices
  # on each of two hosts (process ids 0 and 1), the same command but for --process-id:
  python scripts/eval_recall.py --coordinator host0:1234 --num-processes 2 --process-id 0 --mesh 8x1
"""

from __future__ import annotations

import argparse
import json
import time

import jax.numpy as jnp

from deltamem_jax import distributed
from deltamem_jax.adapter import adapter_identity, load_adapter
from deltamem_jax.cli import load_backbone
from deltamem_jax.evaluation.recall import CONDITIONS, RecallEvaluator, correct, perplexity, plain_text_chunks, summarize, token_f1
from deltamem_jax.session import DEFAULT_ADAPTER
from deltamem_jax.training.data import EpisodeConfig, episodes, max_facts_for, parse_relations
from models.sharding import shard_model

LOCOMO = "../shared/data/locomo/locomo10.json"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="summary output")
    p.add_argument("--records", help="per-episode answers (JSONL)")
    p.add_argument("--adapter", default=str(DEFAULT_ADAPTER))
    p.add_argument("--model", help="HF folder or .gguf (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--limit", type=int, help="evaluate only the first N episodes")
    p.add_argument("--seed", type=int, default=1234, help="evaluation episode seed")
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--max-facts", type=int, help="facts per episode at most (default 6, or one less than the --relations kinds)")
    p.add_argument("--relations", default="", help="comma-separated relation kinds to ask about (default: all), e.g. door_code,locker")
    p.add_argument("--ppl-text", default=LOCOMO, help="plain text for the perplexity ratio (LoCoMo JSON)")
    p.add_argument("--ppl-chunks", type=int, default=8)
    p.add_argument("--ppl-length", type=int, default=512)
    distributed.add_arguments(p)
    a = p.parse_args()
    distributed.initialize(a)
    main_process = distributed.is_main()  # prints and writes; every process computes

    t0 = time.perf_counter()
    model, tok = load_backbone(a.model)
    load_adapter(model, a.adapter)
    mesh = distributed.mesh(a)
    if mesh is not None:
        shard_model(model, mesh)
    n = min(a.episodes, a.limit or a.episodes)
    relations = parse_relations(a.relations)
    max_facts = a.max_facts or min(6, max_facts_for(relations, EpisodeConfig.never_said_rate))
    eps = episodes(a.seed, "eval", 0, n, EpisodeConfig(max_facts=max_facts, relations=relations))
    ev = RecallEvaluator(model, tok)
    records = []
    for i in range(0, n, a.batch):
        chunk = eps[i : i + a.batch]
        ans = ev.answers(chunk)
        for j, e in enumerate(chunk):
            rec = {"index": i + j, "question": e.question, "gold": e.answer, "value": e.value, "relation": e.relation,
                   "num_facts": e.num_facts, "turns_ago": e.turns_ago, "updated": e.updated, "never_said": e.never_said}  # fmt: skip
            for c in CONDITIONS:
                rec[c] = {"reply": ans[c][j], "correct": correct(ans[c][j], e), "f1": token_f1(ans[c][j], e.answer)}
            records.append(rec)
        if main_process:
            print(f"[{min(i + a.batch, n)}/{n} episodes, {time.perf_counter() - t0:.0f} s]", flush=True)
    summary = summarize(records)
    chunks, source = plain_text_chunks(tok, a.ppl_text, a.ppl_chunks, a.ppl_length)
    ppl_frozen = perplexity(model, chunks, with_memory=False)
    ppl_mem = perplexity(model, chunks, with_memory=True)
    summary.update(
        perplexity_ratio=ppl_mem / ppl_frozen, perplexity={"frozen": ppl_frozen, "deltamem_context_memory": ppl_mem, "text": source,
                                                             "chunks": a.ppl_chunks, "tokens_per_chunk": a.ppl_length},
        adapter=a.adapter, adapter_identity=adapter_identity(a.adapter), episodes=n, seed=a.seed, relations=list(relations) or "all", max_facts=max_facts, seconds=time.perf_counter() - t0,
    )  # fmt: skip
    if not main_process:
        return 0

    print(f"\n{n} held-out episodes ({summary['n_answerable']} answerable), adapter {a.adapter}")
    print(f"{'condition':<20}{'accuracy':>10}{'F1':>8}")
    for c in CONDITIONS:
        print(f"{c:<20}{summary[c]:>10.3f}{summary['f1'][c]:>8.3f}")
    print(f"memory_only − mismatched_memory = {summary['memory_only'] - summary['mismatched_memory']:+.3f}")
    for key in ("by_relation", "by_num_facts", "by_turns_ago"):
        print(f"\n{key}: " + "  ".join(c[:12] for c in CONDITIONS))
        for k, v in summary[key].items():
            print(f"  {k:<14} n={v['n']:<4}" + "".join(f"{v[c]['accuracy']:>8.2f}" for c in CONDITIONS))
    for key in ("updated", "never_said"):
        v = summary[key]
        if v:
            print(f"{key} (n={v['n']}): " + ", ".join(f"{c} {v[c]['accuracy']:.2f}" for c in CONDITIONS))
    v = summary["digits_in_place"]
    if v:
        print(f"digits in place (numeric values, n={v['n']}): " + ", ".join(f"{c} {v[c]:.2f}" for c in CONDITIONS))
        for k, f in v["by_num_facts"].items():
            print(f"  {k} facts (n={f['n']}): " + ", ".join(f"{c} {f[c]:.2f}" for c in CONDITIONS))
    print(f"\nperplexity on {source}: frozen {ppl_frozen:.3f}, δ-mem context+memory {ppl_mem:.3f}, ratio {summary['perplexity_ratio']:.4f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=2)
    if a.records:
        with open(a.records, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
