#!/usr/bin/env python
"""Where a decode step's time goes on CPU: XLA's own per-op timings, grouped by what the op does.

Profiles one compiled decode call (`deltamem_jax.decoding.decode`, greedy, batch b,
after a t-token prefill) with the JAX profiler and XLA CPU's per-thunk trace events,
then sorts every op of the optimized program into groups: the layers' weight matvecs
(by weight shape; δ-mem's own projections are the narrow ones), the LM head, attention
over the KV cache (batched dots and their softmax reductions) and the rest.
Each weight group's bytes ÷ its time gives the bandwidth XLA reaches on it, to compare
with the plain `x @ W` figure `bench_decode.py` divides by. This is the "why" behind
a decode's fraction of the roofline; it times nothing the benchmark should quote.

With `--prefill` it profiles the prompt's prefill instead (one compiled forward, so at
most `decoding.PREFILL_SEGMENT` tokens), in ms per prefill: there the long-prompt
question is how attention's matmuls compare with its softmax's element-wise passes
(`--top` names them: exp, max/sum reductions, the mask's select).

    python scripts/profile_decode.py --tokens 512 --json out.json
    python scripts/profile_decode.py --tokens 2048 --memory tsw
    python scripts/profile_decode.py --prefill --tokens 1024 --top 12
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_DEF = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\((.*?)\)(.*)$")


def hlo_ops(text: str) -> tuple[dict, dict]:
    """(name → (shape, opcode, operand names, attributes), fused computation → its ops)."""
    ops, computations, current = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        if line.startswith("%") or line.startswith("ENTRY"):
            current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            continue
        m = _DEF.match(line)
        if m:
            name, shape, opcode, operands, attrs = m.groups()
            ops[name] = (shape, opcode, re.findall(r"%([\w.-]+)", operands), attrs)
            computations[current].append(name)
    return ops, computations


def dims(shape: str) -> list[int]:
    inner = re.search(r"\[([\d,]*)\]", shape)
    return [int(x) for x in inner.group(1).split(",") if x] if inner else []


def nbytes(shape: str) -> int:
    """Bytes of an HLO array shape such as `f32[576,960]{1,0}`."""
    return {"f32": 4, "bf16": 2, "f16": 2}.get(shape.split("[")[0], 4) * math.prod(dims(shape))


def classify(name: str, ops: dict, computations: dict, vocab: int) -> tuple[str, int]:
    """(group, weight bytes read) of one op of the optimized decode program."""
    shape, opcode, operands, attrs = ops[name]
    if opcode == "fusion":
        called = re.search(r"calls=%([\w.-]+)", attrs).group(1)
        inner = [ops[n] for n in computations[called]]
        if any(op == "dot" and "batch_dims" in a for _, op, _, a in inner) or (
            "ynn_fusion" in name and any(op == "reduce" for _, op, _, _ in inner)
        ):
            return "attention (batched dots, softmax)", 0
        dots = [n for n in computations[called] if ops[n][1] == "dot"]  # at b > 1 XLA fuses matmuls with their neighbours
        if dots:
            return classify(dots[0], ops, computations, vocab)
        return "other (norms, RoPE, cache writes, sampling, ...)", 0
    if opcode == "dot":
        if "batch_dims" in attrs:
            return "attention (batched dots, softmax)", 0
        weight = ops[operands[1]][0]
        if dims(shape)[-1] == vocab:
            return "LM head", nbytes(weight)
        w = dims(weight)
        return f"weights {w[0]}×{w[1]}" if len(w) == 2 else "weights", nbytes(weight)
    return "other (norms, RoPE, cache writes, sampling, ...)", 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512, help="prompt length before the decode (cache slots in use)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=16, help="decode steps in the profiled call")
    p.add_argument("--memory", choices=("none", "tsw", "msw"), default="none", help="δ-mem variant (untrained init)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls before the profiled one")
    p.add_argument("--top", type=int, default=0, help="also print the N ops that take the most time")
    p.add_argument("--json", help="write the groups as JSON here")
    p.add_argument("--prefill", action="store_true", help="profile the prefill of the prompt instead (ms per prefill)")
    args = p.parse_args()

    # Before JAX starts: per-thunk trace events, and the optimized HLO to name the ops by.
    dump = tempfile.mkdtemp(prefix="profile_decode_")
    program = "_forward" if args.prefill else "_decode"
    flags = f"--xla_cpu_enable_xprof_traceme=true --xla_dump_to={dump} --xla_dump_hlo_module_re=.*{program}.*"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    import jax
    import numpy as np

    from deltamem_jax.adapter import attach
    from deltamem_jax.cli import load_backbone
    from deltamem_jax.config import DeltaMemConfig
    from deltamem_jax.decoding import PREFILL_SEGMENT, decode, prefill
    from deltamem_jax.state import MemoryState
    from models.decoder import KVCache

    if args.prefill and args.tokens > PREFILL_SEGMENT:
        p.error(f"--prefill profiles one compiled forward: at most {PREFILL_SEGMENT} tokens, got {args.tokens}")
    model, _ = load_backbone()
    cfg, b, t, steps = model.cfg, args.batch, args.tokens, args.steps
    memory = None
    if args.memory != "none":
        mc = DeltaMemConfig(num_state_heads=4 if args.memory == "msw" else 1)
        attach(model, mc)
        memory = MemoryState.zeros(cfg.num_layers, b, mc)
    tokens = jax.numpy.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t)), jax.numpy.int32)
    positions = jax.numpy.broadcast_to(jax.numpy.arange(t, dtype=jax.numpy.int32), (b, t))
    valid = jax.numpy.ones((b, t), bool)

    def ready():
        state = prefill(model, tokens, positions, valid, KVCache.create(cfg, b, t + steps), memory)
        return jax.block_until_ready(state)

    per, unit = (1, "prefill") if args.prefill else (steps, "step")

    def prepared():
        """The call to profile, ready to run: a prefill, or a decode call after its own
        prefill (not timed, not traced)."""
        if args.prefill:
            return ready
        state = ready()
        return lambda: decode(model, state, steps)[1]

    def timed(call) -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        return (time.perf_counter() - t0) / per

    timed(prepared())  # compile
    times = [timed(prepared()) for _ in range(args.repeats)]
    call = prepared()
    trace_dir = Path(dump) / "trace"
    jax.profiler.start_trace(str(trace_dir))
    profiled = timed(call)
    jax.profiler.stop_trace()

    hlo = max(Path(dump).glob(f"*jit_{program}*cpu_after_optimizations.txt"), key=lambda f: f.stat().st_size)
    ops, computations = hlo_ops(hlo.read_text())
    events = json.load(gzip.open(next(trace_dir.rglob("*.trace.json.gz"))))["traceEvents"]
    groups = collections.defaultdict(lambda: {"ms_per_step": 0.0, "ops_per_step": 0.0, "weight_bytes": 0})
    unnamed, per_op = 0.0, collections.Counter()
    for e in events:
        name = e.get("args", {}).get("hlo_op")
        if e.get("ph") != "X" or name is None or e["name"] != name or e["args"].get("hlo_module", f"jit_{program}") != f"jit_{program}":
            continue  # not an op of the profiled program (a prefill's small eager ops are programs of their own)
        if name not in ops:
            unnamed += e["dur"]
            continue
        group, nbytes = classify(name, ops, computations, cfg.vocab_size)
        g = groups[group]
        g["ms_per_step"] += e["dur"] / 1e3 / per
        g["ops_per_step"] += 1 / per
        g["weight_bytes"] += nbytes / per
        per_op[name] += e["dur"] / 1e3 / per
    total = sum(g["ms_per_step"] for g in groups.values())
    what = f"prefill of {t} tokens, b={b}" if args.prefill else f"decode b={b} after {t} tokens"
    print(f"{what}, δ-mem {args.memory}: {1e3 * min(times):.2f} ms/{unit} best of "
          f"{args.repeats} ({1e3 * float(np.median(times)):.2f} median), profiled call {1e3 * profiled:.2f} ms/{unit}; "
          f"ops' own time {total:.2f} ms/{unit} (ops on other threads, as parts of big matmuls, are not in it)")
    print(f"{'group':<50} {'ms/' + unit:>10} {'share':>6} {'ops':>6} {'GB/s':>6}")
    for name, g in sorted(groups.items(), key=lambda kv: -kv[1]["ms_per_step"]):
        # a prefill's matmuls are bound by compute, not by their weights' bytes: no GB/s for them
        gbs = g["weight_bytes"] / (g["ms_per_step"] / 1e3) / 1e9 if g["weight_bytes"] and not args.prefill else None
        g["gb_per_s"] = gbs
        print(f"{name:<50} {g['ms_per_step']:10.2f} {g['ms_per_step'] / total:6.1%} {g['ops_per_step']:6.0f} "
              f"{'' if gbs is None else f'{gbs:6.1f}'}")
    for name, ms in per_op.most_common(args.top):
        print(f"  {ms:9.2f} ms/{unit}  {name} {ops[name][0]}  ({classify(name, ops, computations, cfg.vocab_size)[0]})")
    if args.json:
        out = {"tokens": t, "batch": b, "steps": steps, "memory": args.memory, "profiled": unit, "ms_per_step_best": 1e3 * min(times),
               "ms_per_step_runs": [1e3 * x for x in times], "ops_ms_per_step": total, "groups": groups}
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
