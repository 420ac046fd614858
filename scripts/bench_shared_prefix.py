#!/usr/bin/env python
"""Questions about one long document: a shared prefix vs the prefix copied into every row.

Side by side in one run, on the embedded SmolLM2-135M-Instruct with the default adapter
(official protocol: the questions and replies are written into the memory): one document
of `--prefix` tokens is prefilled once; then a batch of `--batch` questions of 32 tokens
is prefilled after it and `--steps` tokens are decoded, either

  tiled   with the document's KV cache copied into every row (what the LoCoMo runner did
          before `SharedPrefix`), or
  shared  with every row attending to one copy (`KVCache.create(..., prefix=SharedPrefix.of(...))`).

Each variant is timed best-of-`--repeats` (rounds interleave the variants), after one
warm-up that compiles it. Greedy tokens must agree. The KV bytes each batch holds are
computed from the shapes. Prints a table and, with `--json`, writes the figures.

Usage:
  python scripts/bench_shared_prefix.py --prefix 4096 --batch 8 --steps 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix", type=int, default=4096, help="document tokens")
    p.add_argument("--batch", type=int, default=8, help="questions per batch")
    p.add_argument("--steps", type=int, default=16, help="decode steps")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from deltamem_jax.adapter import memory_of
    from deltamem_jax.decoding import decode, left_pad, prefill, prompt_length
    from deltamem_jax.session import Session
    from deltamem_jax.state import MemoryState, WriteControl
    from models.decoder import KVCache, SharedPrefix

    model = Session.default().model
    cfg = model.cfg
    rng = np.random.default_rng(0)
    doc = [int(t) for t in rng.integers(100, cfg.vocab_size, a.prefix)]
    length = prompt_length(len(doc))
    tokens, positions, valid = left_pad([doc], length)
    mem0 = MemoryState.zeros(cfg.num_layers, 1, memory_of(model).config)
    t0 = time.perf_counter()
    one = prefill(model, tokens, positions, valid, KVCache.create(cfg, 1, length), mem0, WriteControl())
    jax.block_until_ready(one.logits)
    doc_s = time.perf_counter() - t0
    shared = SharedPrefix.of(one.cache)
    qs = [[int(t) for t in rng.integers(100, cfg.vocab_size, 32)] for _ in range(a.batch)]
    q_tokens, q_pos, q_valid = left_pad(qs, 32)
    q_pos = q_pos + one.positions[0]
    memory = MemoryState(S=jnp.repeat(one.memory.S, a.batch, axis=1))
    room = 32 + a.steps

    # the old runner prefilled the document into a cache with room for the questions, then
    # copied it to every row of each batch (the copy is part of each batch's time)
    c = KVCache.create(cfg, 1, length + room)
    base = c.replace(k=c.k.at[:, :, :, :, :length].set(one.cache.k), v=c.v.at[:, :, :, :length].set(one.cache.v),
                     valid=c.valid.at[:, :length].set(one.cache.valid), end=one.cache.end)  # fmt: skip

    def tiled_cache():
        b = a.batch
        return base.replace(k=jnp.repeat(base.k, b, axis=1), v=jnp.repeat(base.v, b, axis=1), valid=jnp.repeat(base.valid, b, axis=0))

    variants = {
        "tiled": tiled_cache,
        "shared": lambda: KVCache.create(cfg, a.batch, room, prefix=shared),
    }

    def run(make):
        t0 = time.perf_counter()
        cache = make()
        st = prefill(model, q_tokens, q_pos, q_valid, cache, memory, WriteControl())
        st, toks, _ = decode(model, st, a.steps)
        toks = np.asarray(toks)
        return time.perf_counter() - t0, toks, st

    times = {k: [] for k in variants}
    tokens_out = {}
    for name, make in variants.items():  # warm-up: compiles each variant's shapes
        _, tokens_out[name], st = run(make)
        del st
    for r in range(a.repeats):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            dt, toks, st = run(variants[name])
            del st
            times[name].append(dt)
    same = bool(np.array_equal(tokens_out["tiled"], tokens_out["shared"]))
    itemsize = jnp.dtype(cfg.jnp_dtype).itemsize
    per_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize  # k and v, every layer
    kv_bytes = {"tiled": a.batch * (length + room) * per_slot, "shared": (length + a.batch * room) * per_slot}
    best = {k: min(v) for k, v in times.items()}
    out = {
        "prefix_tokens": a.prefix, "batch": a.batch, "steps": a.steps, "document_prefill_s": doc_s,
        "best_s": best, "runs_s": times, "kv_bytes": kv_bytes, "speedup_shared_vs_tiled": best["tiled"] / best["shared"],
        "same_greedy_tokens": same, "cpu": _cpu(), "jax": jax.__version__,
    }  # fmt: skip
    print(f"CPU: {out['cpu']}; document of {a.prefix} tokens prefilled in {doc_s:.1f} s; batch {a.batch}, {a.steps} decode steps")
    print("| variant | best s (question prefill + decode) | KV cache held |")
    print("|---|---:|---:|")
    for k in variants:
        print(f"| {k} | {best[k]:.2f} | {kv_bytes[k] / 2**20:.0f} MiB |")
    print(f"shared ÷ tiled speed-up: {out['speedup_shared_vs_tiled']:.2f}×; same greedy tokens: {same}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    if not same:
        raise SystemExit("error: the shared prefix decoded other tokens than the tiled cache")


def _cpu() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        return None


if __name__ == "__main__":
    main()
