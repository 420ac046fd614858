#!/usr/bin/env python
"""Training speed: train step vs a forward-only pass on the same episodes, side by side.

For write passes of 512 and 2,048 tokens (official protocol: one write pass over the
history with writes on, then the read pass over system + question + answer), measures
  forward   the episode loss without gradients (same tokens, writes on, remat off)
  train     the full jitted train step (gradients through the write pass, AdamW update)
each the best of `--repeats` timed calls after a compile call, interleaved, plus the
peak memory XLA plans for each compiled program (`memory_analysis()`: arguments + outputs
+ temporaries) and training tokens/s (write + read tokens per second of train step).

`--json` writes the worst `train_step_over_forward` and the lowest `train_tokens_per_s`
(plus every cell). Default backbone: the embedded SmolLM2-135M-Instruct; `--random-weights`
uses its shape with random weights (no GGUF needed, same speed).

Usage:
  python scripts/bench_train.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

import deltamem_jax as dm
from deltamem_jax.training.batches import Batch, Layout, Segment
from deltamem_jax.training.step import OptimConfig, episode_loss, make_optimizer, make_train_step, split_model

SMOLLM2 = dict(
    family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
    num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
)  # fmt: skip


def load(random_weights: bool):
    if not random_weights:
        from models.loading import load_gguf

        return load_gguf()[0]
    from flax import nnx

    import models
    from models.config import ModelConfig

    return models.Decoder(ModelConfig(**SMOLLM2), nnx.Rngs(0))


def episode_batch(cfg, batch: int, history: int, layout: Layout, seed: int = 0, session: bool = False) -> Batch:
    """Random-token episodes: a `history`-token write pass (official), or (session) the
    training layout's history turns, each after the system segment; a 64-token read pass."""
    rng = np.random.default_rng(seed)

    def seg(b, t):
        return Segment(rng.integers(3, cfg.vocab_size, (b, t)).astype(np.int32), np.tile(np.arange(t, dtype=np.int32), (b, 1)), np.ones((b, t), bool))

    read = seg(batch, layout.read_len)
    a = layout.answer_len
    index = np.tile(np.arange(layout.read_len - a - 1, layout.read_len - 1, dtype=np.int32), (batch, 1))
    targets = np.take_along_axis(read.tokens, index + 1, axis=1)
    mask = np.ones((batch, a), bool)
    value = np.zeros((batch, a), bool)  # the timing does not depend on the loss weights
    if session:
        turns = seg(batch * layout.max_turns, layout.turn_len)
        turns = Segment(*(x.reshape(batch, layout.max_turns, layout.turn_len) for x in (turns.tokens, turns.positions + 32, turns.valid)))
        return Batch(seg(batch, 32), turns, None, read, index, targets, mask, value)
    return Batch(seg(batch, 32), None, seg(batch, history), read, index, targets, mask, value)


def peak_bytes(compiled) -> int | None:
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lengths", default="512,2048")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sub-states", type=int, default=1)
    p.add_argument("--no-remat", action="store_true", help="train step without per-layer recomputation (as `train --no-remat`)")
    p.add_argument("--session", action="store_true", help="also time the session-protocol training layout (9 turns of 32 tokens)")
    a = p.parse_args()

    model = load(a.random_weights)
    dm.attach(model, dm.DeltaMemConfig(num_state_heads=a.sub_states))
    graphdef, params, frozen = split_model(model)
    tx = make_optimizer(OptimConfig(steps=100))
    opt_state = tx.init(params)
    layout = Layout()
    cells = []
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), CPU: {cpu_name()}, jax {jax.__version__}")
    grid = [(int(x), False) for x in a.lengths.split(",")] + ([(layout.max_turns * (32 + layout.turn_len), True)] if a.session else [])
    for n, session in grid:
        batch = jax.tree.map(jnp.asarray, episode_batch(model.cfg, a.batch, n, layout, session=session))
        fwd = jax.jit(lambda p, f, b: episode_loss(p, f, graphdef, b, remat=False)[0])
        step = make_train_step(graphdef, tx, remat=not a.no_remat)
        t0 = time.perf_counter()
        fwd_c = fwd.lower(params, frozen, batch).compile()
        step_c = step.lower(params, opt_state, frozen, batch).compile()
        compile_s = time.perf_counter() - t0
        times = {"forward": [], "train": []}
        p_, o_ = jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, opt_state)
        for r in range(a.repeats + 1):  # the first round warms up
            t = time.perf_counter()
            jax.block_until_ready(fwd_c(p_, frozen, batch))
            tf = time.perf_counter() - t
            t = time.perf_counter()
            p_, o_, m = step_c(p_, o_, frozen, batch)
            jax.block_until_ready(m)
            tt = time.perf_counter() - t
            if r:
                times["forward"].append(tf)
                times["train"].append(tt)
        tokens = a.batch * (n + layout.read_len)
        cell = {
            "protocol": "session" if session else "official", "remat": not a.no_remat, "write_tokens": n, "batch": a.batch, "forward_s": min(times["forward"]), "train_s": min(times["train"]),
            "train_step_over_forward": min(times["train"]) / min(times["forward"]),
            "train_tokens_per_s": tokens / min(times["train"]), "forward_tokens_per_s": tokens / min(times["forward"]),
            "peak_bytes_forward": peak_bytes(fwd_c), "peak_bytes_train": peak_bytes(step_c), "compile_s": compile_s,
            "raw": times,
        }  # fmt: skip
        cells.append(cell)
        mb = lambda x: "n/a" if x is None else f"{x / 2**20:.0f} MiB"  # noqa: E731
        print(
            f"{'session' if session else 'official'} write {n:5d} tokens, batch {a.batch}: forward {cell['forward_s']:.3f} s, train step {cell['train_s']:.3f} s "
            f"(x{cell['train_step_over_forward']:.2f}), {cell['train_tokens_per_s']:.0f} train tok/s, "
            f"peak forward {mb(cell['peak_bytes_forward'])}, train {mb(cell['peak_bytes_train'])}, compile {compile_s:.0f} s"
        )
    summary = {
        "train_step_over_forward": max(c["train_step_over_forward"] for c in cells),
        "train_tokens_per_s": min(c["train_tokens_per_s"] for c in cells),
        "device": f"{device.device_kind} ({jax.default_backend()})", "cpu": cpu_name(), "jax": jax.__version__,
        "weights": "random (SmolLM2-135M shape)" if a.random_weights else "SmolLM2-135M-Instruct (GGUF)",
        "cells": cells,
    }  # fmt: skip
    print(f"worst train_step_over_forward {summary['train_step_over_forward']:.2f} (target ≤ 3), "
          f"train_tokens_per_s {summary['train_tokens_per_s']:.0f}")  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
