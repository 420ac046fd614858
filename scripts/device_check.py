#!/usr/bin/env python
"""One short check for a GPU or TPU machine (about ten minutes), printing one table.

    python scripts/device_check.py            # on the accelerator; paste the table into docs/RESULTS.md
    python scripts/device_check.py --tiny     # tiny shapes, any machine (a minute on a CPU)

Rows:
  tests    the accelerator-relevant tests (writers and their precision, bf16 backbone with
           float32 memory, decoding, the memory module), pass/fail and seconds;
  decode   tokens/s of the compiled decode loop at batch 1 and 32, with δ-mem, on the
           SmolLM2-135M and Qwen3-0.6B shapes with random weights (bf16 backbone on an
           accelerator), after a 128-token prefill;
  prefill  tokens/s of an 8,192-token prefill on the SmolLM2-135M shape with δ-mem, prompt
           attention blockwise (XLA) against "auto" (cuDNN's fused kernel on a GPU, bf16);
  write    tokens/s of one layer's memory write, token scan vs chunked (the accelerator
           default), at 1k, 8k and 64k tokens;
  train    tokens/s of the train step on the SmolLM2 shape (official protocol, batch 8,
           512-token history), after compilation.
Nothing else in the project depends on this script or on its results.
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import SMOLLM2, episode_batch  # noqa: E402
from bench_writers import features  # noqa: E402

import deltamem_jax as dm  # noqa: E402
import models  # noqa: E402
from deltamem_jax.decoding import decode, prefill  # noqa: E402
from deltamem_jax.delta_rule import write_chunked, write_scan  # noqa: E402
from deltamem_jax.training.batches import Layout  # noqa: E402
from deltamem_jax.training.step import OptimConfig, make_optimizer, make_train_step, split_model  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.decoder import KVCache, prompt_attention_kind  # noqa: E402

QWEN3_06B = dict(
    family="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16,
    num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True, tie_word_embeddings=True,
)  # fmt: skip
TINY = dict(
    family="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
)  # fmt: skip
# (the multi-device tests run on virtual CPU devices anywhere: not part of this check)
TESTS = ["tests/test_delta_rule.py", "tests/test_dtypes.py", "tests/test_decoding.py", "tests/test_memory.py",
         "tests/test_long_prompts.py::test_cudnn_attention_equals_dense_in_bfloat16", "tests/test_long_prompts.py::test_prompt_attention_choice"]  # fmt: skip


def timed(fn, repeats: int = 3) -> float:
    """Best wall seconds of `repeats` calls of `fn` (after one call that compiles)."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def model_with_memory(shape: dict, dtype: str, attention: str = "auto") -> models.Decoder:
    model = models.Decoder(ModelConfig(**shape, dtype=dtype, attention=attention), nnx.Rngs(0))
    return dm.attach(model, dm.DeltaMemConfig())


def prefill_rate(model: models.Decoder, tokens: int) -> float:
    """Prefill tokens/s of one `tokens`-long prompt (segments of 2,048)."""
    cfg = model.cfg
    ids = jax.random.randint(jax.random.key(0), (1, tokens), 0, cfg.vocab_size)
    positions, valid = jnp.arange(tokens)[None], jnp.ones((1, tokens), bool)

    def run():
        cache = KVCache.create(cfg, 1, tokens)
        memory = dm.MemoryState.zeros(cfg.num_layers, 1, dm.memory_of(model).config)
        return prefill(model, ids, positions, valid, cache, memory, segment=2048).logits

    return tokens / timed(run, repeats=2)


def decode_rate(model: models.Decoder, batch: int, prompt: int, steps: int) -> float:
    """Decode tokens/s (all rows) after a `prompt`-token prefill."""
    cfg = model.cfg
    tokens = jax.random.randint(jax.random.key(0), (batch, prompt), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(prompt), (batch, prompt))
    valid = jnp.ones((batch, prompt), bool)

    def run():
        cache = KVCache.create(cfg, batch, prompt + steps)
        memory = dm.MemoryState.zeros(cfg.num_layers, batch, dm.memory_of(model).config)
        state = prefill(model, tokens, positions, valid, cache, memory)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        state, out, _ = decode(model, state, steps)
        jax.block_until_ready(out)
        return time.perf_counter() - t0

    run()  # compiles
    return batch * steps / min(run() for _ in range(2))


def write_rate(writer, tokens: int) -> float:
    x, s, valid = features(1, tokens, 1), jnp.zeros((1, 1, 8, 8)), jnp.ones((1, tokens), bool)
    fn = jax.jit(writer)
    return tokens / timed(lambda: fn(s, x, valid))


def train_rate(shape: dict, dtype: str, history: int, batch: int) -> float:
    model = model_with_memory(shape, dtype)
    graphdef, params, frozen = split_model(model)
    tx = make_optimizer(OptimConfig(steps=100))
    step = make_train_step(graphdef, tx)
    layout = Layout()
    data = jax.tree.map(jnp.asarray, episode_batch(model.cfg, batch, history, layout))
    state = {"params": params, "opt": tx.init(params)}

    def one():
        state["params"], state["opt"], m = step(state["params"], state["opt"], frozen, data)
        return m["loss"]

    return batch * (history + layout.read_len) / timed(one, repeats=2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes and lengths, no test run: checks the script itself on any machine")
    a = p.parse_args()
    accelerator = jax.default_backend() != "cpu"
    dtype = "bfloat16" if accelerator else "float32"
    device = jax.devices()[0]
    print(f"device: {getattr(device, 'device_kind', device.platform)} × {len(jax.devices())} ({jax.default_backend()}), "
          f"jax {jax.__version__}, backbone {dtype}, memory float32{' — TINY shapes' if a.tiny else ''}", flush=True)  # fmt: skip
    rows: list[tuple[str, str, str]] = []

    if a.tiny:
        rows.append(("tests", "skipped (--tiny)", "-"))
    else:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", *TESTS], capture_output=True, text=True)
        summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
        rows.append(("tests", " ".join(Path(t).stem for t in TESTS), f"{'pass' if proc.returncode == 0 else 'FAIL'}: {summary} ({time.perf_counter() - t0:.0f} s)"))

    shapes = {"tiny": TINY} if a.tiny else {"SmolLM2-135M": SMOLLM2, "Qwen3-0.6B": QWEN3_06B}
    prompt, steps = (16, 8) if a.tiny else (128, 64)
    for name, shape in shapes.items():
        model = model_with_memory(shape, dtype)
        for batch in (1, 4) if a.tiny else (1, 32):
            rows.append(("decode", f"{name}, batch {batch}, {steps} tokens after {prompt}", f"{decode_rate(model, batch, prompt, steps):,.0f} tokens/s"))
        del model

    prefill_tokens = 256 if a.tiny else 8192
    for attention in ("blockwise", "auto"):
        model = model_with_memory(TINY if a.tiny else SMOLLM2, dtype, attention)
        kind = prompt_attention_kind(model.cfg)
        rows.append(("prefill", f"{'tiny' if a.tiny else 'SmolLM2-135M'}, {prefill_tokens} tokens, attention {attention} ({kind})",
                     f"{prefill_rate(model, prefill_tokens):,.0f} tokens/s"))  # fmt: skip
        del model

    lengths = (256, 1024) if a.tiny else (1024, 8192, 65536)
    for tokens in lengths:
        for writer, fn in (("scan", write_scan), ("chunked 64", functools.partial(write_chunked, chunk_size=64))):
            rows.append(("write", f"{writer}, {tokens} tokens, one layer", f"{write_rate(fn, tokens):,.0f} tokens/s"))

    shape, history, batch = (TINY, 64, 2) if a.tiny else (SMOLLM2, 512, 8)
    name = "tiny" if a.tiny else "SmolLM2-135M"
    rows.append(("train", f"{name}, batch {batch}, history {history} + read {Layout().read_len}", f"{train_rate(shape, dtype, history, batch):,.0f} tokens/s"))

    print("| check | setting | result |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
