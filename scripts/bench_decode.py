#!/usr/bin/env python
"""Decode / prefill benchmark on CPU: plain backbone vs δ-mem (TSW, MSW) vs transformers.

Measures, side by side in ONE run on the same machine, for SmolLM2-135M-Instruct (the
embedded GGUF, dequantized to float32):

  jax/plain   the frozen backbone (a model without δ-mem; memory=None)
  jax/tsw     δ-mem TSW  (DeltaMemConfig())
  jax/msw     δ-mem MSW  (DeltaMemConfig(num_state_heads=4))
  torch       transformers' `generate` (PyTorch, CPU, greedy, KV cache, 2 threads) on the
              plain model, its weights dequantized from the same GGUF

Methods (also written into the JSON):

* Prompts are random token ids (one fixed seed per shape, identical for every engine),
  no padding. Every JAX variant uses the same KV-cache length: prompt + decode steps.
* JAX prefill: wall time of `generate.prefill(...)` up to `block_until_ready`. Its jitted
  forward is compiled ahead of time first (`lower().compile()`, timed and reported as the
  compile time; an untimed prefill of a 1-layer, 16-wide decoder of the same shape also
  compiles prefill's small eager ops), so no measurement includes compilation.
* JAX decode: wall time of `generate.decode(model, state, steps)` (one compiled scan of
  `steps` greedy steps; every step feeds one token per row) on a fresh copy of the same
  post-prefill state (its cache per layer where decode runs per layer, as a stream's
  calls after its first find it: the one copy per reply that unstacks it is not timed),
  after one warm-up call of the same shape (its compile time, from jax.monitoring
  compile events, is reported). tokens/s = batch · steps / time.
* Compile times = seconds of JAX trace + lowering + XLA compile events (jax.monitoring).
  Any timed call during which such an event fired is discarded and rerun (counted in
  the JSON as `discarded_runs_with_compilation`).
* Quick grid (--quick, every cell measured, within 5 min on a quiet 2-core machine): b=1
  and b=8 at T=512, b=1 at T=2048; 16 decode steps per call, 5 decode rounds, 3/1/2
  prefill runs, torch best of 2. The run says whether it stayed within the 300 s limit.
  Long (--long): b=1 at T=8176 (SmolLM2's 8,192-token window minus 16 decode steps).
  Full grid: b ∈ {1, 8} × T ∈ {512, 2048}; 64 decode steps, 6 decode rounds, 3/2/2/1
  prefill runs, torch best of 2. Many short decode rounds beat few long ones on a shared
  machine: each variant is more likely to get at least one undisturbed run (b=8 decode
  varies ±15% run to run here even with no other process running).
* Repeats: each figure is the best (minimum time) of its timed runs (decode: `repeats`
  rounds; prefill: fewer for the long shapes, see `settings.prefill_repeats`, and where
  only one, after an untimed prefill of the first variant); within a shape
  the rounds interleave the variants (the order rotates each round) so slow phases of a
  shared machine hit every variant alike. All raw times are in the JSON.
* torch: one `generate(max_new_tokens=steps+1, min_new_tokens=steps+1)` per repeat, with
  a LogitsProcessor that records a timestamp each time logits are ready (once per
  forward). prefill = first stamp − start of `generate` (generate's setup + the prompt
  forward); decode time per step = (last stamp − first stamp) / steps, i.e. `steps`
  single-token forwards with the KV cache, each preceded by greedy selection.
  tokens/s = batch / (decode time per step). It runs in a worker subprocess (own
  threads, torch.set_num_threads(2)); a short-prompt warm-up `generate` per batch size
  comes first. Its shapes are measured right after the JAX ones of the same shape.
* Other processes: the CPU time other processes used during each window is read from
  /proc and reported in cores ("other procs"); figures from windows above ~0.25 cores are
  disturbed (torch's OpenMP decode degrades by 10-50x under contention, JAX far less).
* Roofline: the bandwidth a plain jitted `x @ W` reaches (W the 113 MB LM-head shape,
  best of 10 calls), probed just before every timed decode round, since what the machine
  gives a process swings from moment to moment (29–46 GB/s a few seconds apart on the AMD
  EPYC); a round's fraction = steps/s × bytes one step must stream (every weight once, the
  tied embedding as the LM head, plus the KV cache) ÷ its probe; a decode's fraction is
  the median over its rounds. The bandwidth at the start and the end (best of 30) is printed.
* Peak RSS per prefill: the process's peak resident memory (VmHWM, reset through
  /proc/self/clear_refs before each prefill), with the growth over the resident memory
  before it (+Δ); torch's covers its whole generate() call.

Worst-case ratios (top-level keys of the JSON) and their targets:
  decode_ratio_deltamem_vs_plain  = min over {tsw, msw} × grid of δ-mem tok/s ÷ plain tok/s   (≥ 0.97)
  prefill_ratio_deltamem_vs_plain = max over {tsw, msw} × grid of δ-mem s ÷ plain s           (≤ 1.05)
  decode_ratio_ours_vs_torch      = min over grid of jax/plain tok/s ÷ torch tok/s             (≥ 2)
  prefill_ratio_ours_vs_torch     = max over grid of jax/plain prefill s ÷ torch prefill s     (≤ 1)
  decode_fraction_of_roofline_b1  = min over b=1 cells of jax/plain's fraction of roofline     (≥ 0.6)

Usage:
  python scripts/bench_decode.py --quick --json /tmp/bench_quick.json
  python scripts/bench_decode.py --json /tmp/bench_full.json
  python scripts/bench_decode.py --long --json /tmp/bench_long.json
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGETS = {
    "decode_ratio_deltamem_vs_plain": (">=", 0.97),
    "prefill_ratio_deltamem_vs_plain": ("<=", 1.05),
    "decode_ratio_ours_vs_torch": (">=", 2.0),
    "prefill_ratio_ours_vs_torch": ("<=", 1.0),
    "decode_fraction_of_roofline_b1": (">=", 0.6),
}
QUICK_LIMIT_S = 300  # --quick measures every cell of its grid within this
SCAN_LAYERS = [None]  # --layers: decode's scan_layers argument (None = the backend default)
LONG_T = 8192 - 16  # --long: the longest prompt that leaves 16 decode steps in SmolLM2's window
RESULT_PREFIX = "@@RESULT "


def peak_rss_reset() -> bool:
    """Resets this process's peak resident set (Linux: `5` > /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes(field: str = "VmHWM") -> int | None:
    """Peak (`VmHWM`) or current (`VmRSS`) resident memory of this process, in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def shape_key(b: int, t: int) -> str:
    return f"b{b}_t{t}"


def prompt_ids(seed: int, b: int, t: int, vocab: int):
    import numpy as np

    return np.random.default_rng(seed).integers(3, vocab, (b, t), dtype=np.int64)


# ------------------------------------------------------------------------ torch worker


def torch_model_from_gguf(torch, transformers):
    """transformers' `LlamaForCausalLM` (float32) on the embedded GGUF's weights, dequantized by
    `models.gguf.read_gguf` as our loader does: the same numbers `from_pretrained(gguf_file=)`
    gives (equal weights and logits, `docs/runs/scratch_s20/torch_from_gguf_check.py`), built
    in 8–16 s against its 21–28 s here, which `--quick`'s 5 minutes need. Raises unless every
    weight but a tied LM head was loaded."""
    import contextlib

    import numpy as np

    from models.gguf import read_gguf

    try:
        from transformers.initialization import no_init_weights  # the random init is wasted work
    except ImportError:
        no_init_weights = contextlib.nullcontext
    ck = read_gguf()
    config = transformers.AutoConfig.for_model(**ck.config)
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # writable copies: some arrays are views of the read-only file, which torch warns about
    weights = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in ck.tensors.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if config.tie_word_embeddings else set()):
        raise ValueError(f"GGUF weights do not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def torch_worker() -> None:
    """Builds the transformers model (`torch_model_from_gguf`), then answers one JSON request per stdin line."""

    def reply(obj):
        sys.stdout.write(RESULT_PREFIX + json.dumps(obj) + "\n")
        sys.stdout.flush()

    try:
        import torch
        import transformers
        from transformers import LogitsProcessor, LogitsProcessorList
    except Exception as e:  # noqa: BLE001
        reply({"ready": False, "reason": f"torch/transformers not importable: {type(e).__name__}: {e}"})
        return
    try:
        torch.set_num_threads(2)
        t0 = time.perf_counter()
        model = torch_model_from_gguf(torch, transformers)
        load_s = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001
        reply({"ready": False, "reason": f"could not build the transformers model: {type(e).__name__}: {e}"})
        return
    reply({
        "ready": True,
        "load_s": load_s,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "vocab_size": model.config.vocab_size,
    })

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    def gen(ids, n):
        stamp = Stamp()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                num_beams=1,
                use_cache=True,
                pad_token_id=0,
                logits_processor=LogitsProcessorList([stamp]),
            )
        t1 = time.perf_counter()
        if out.shape[1] != ids.shape[1] + n or len(stamp.times) != n:
            raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens / {len(stamp.times)} stamps, wanted {n}")
        return t0, stamp.times, t1

    warm = set()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            b, t, steps = req["b"], req["t"], req["steps"]
            if b not in warm:  # first-call overheads (allocator, kernels) on a short prompt
                gen(torch.from_numpy(prompt_ids(1, b, 32, model.config.vocab_size)), 4)
                warm.add(b)
            ids = torch.from_numpy(prompt_ids(req["seed"], b, t, req["vocab"]))
            runs = []
            for _ in range(req["repeats"]):
                base = rss_bytes("VmRSS")
                peak_rss_reset()
                t0, stamps, t1 = gen(ids, steps + 1)
                runs.append({
                    "prefill_s": stamps[0] - t0,
                    "decode_s": stamps[-1] - stamps[0],
                    "total_s": t1 - t0,
                    "rss_before_bytes": base,
                    "peak_rss_bytes": rss_bytes(),  # over the whole generate (prefill dominates)
                })
            best_dec = min(r["decode_s"] for r in runs)
            reply({
                "ok": True,
                "prefill_s": min(r["prefill_s"] for r in runs),
                "decode_s": best_dec,
                "decode_steps": steps,
                "decode_tok_s": b * steps / best_dec,
                "prefill_peak_rss_bytes": max((r["peak_rss_bytes"] or 0) for r in runs) or None,
                "rss_before_bytes": runs[0]["rss_before_bytes"],
                "runs": runs,
            })
        except Exception as e:  # noqa: BLE001
            reply({"ok": False, "reason": f"{type(e).__name__}: {e}"})


class TorchClient:
    """The parent's handle on the torch worker subprocess (started early: it loads in parallel)."""

    def __init__(self):
        self.reason = None
        self.info = None
        self.log = tempfile.NamedTemporaryFile("w+", prefix="bench_torch_", suffix=".log", delete=False)
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        env.setdefault("HF_HUB_OFFLINE", "1")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--_torch-worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=str(REPO),
        )

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX):])
        self.log.flush()
        tail = Path(self.log.name).read_text()[-1500:]
        return {"ready": False, "ok": False, "reason": f"torch worker exited (rc={self.proc.wait()}); log tail:\n{tail}"}

    def wait_ready(self) -> bool:
        if self.info is None and self.reason is None:
            msg = self._read()
            if msg.get("ready"):
                self.info = msg
            else:
                self.reason = msg.get("reason", "unknown")
                self.close()
        return self.info is not None

    def measure(self, **req) -> dict:
        if not self.wait_ready():
            return {"ok": False, "reason": self.reason}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001
                self.proc.kill()


# ------------------------------------------------------------------------ JAX side


def build_variants(model):
    """plain (a model without δ-mem), TSW and MSW models sharing the backbone arrays."""
    from flax import nnx

    from deltamem_jax.adapter import attach
    from deltamem_jax.config import DeltaMemConfig

    variants = {"plain": (model, None)}
    for name, config in (("tsw", DeltaMemConfig()), ("msw", DeltaMemConfig(num_state_heads=4))):
        m = nnx.merge(*nnx.split(model))  # new module objects, same (immutable) weight arrays
        attach(m, config)
        variants[name] = (m, config)
    return variants


class CompileWatch:
    """Seconds JAX spends tracing, lowering and compiling (from jax.monitoring events).

    Used to report compile times and to guarantee that no timed call included a
    compilation: a timed call during which any compile event fired is discarded and rerun.
    """

    EVENTS = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    )

    def __init__(self):
        import jax.monitoring

        self.seconds = 0.0
        self.events = 0
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event, duration, **_kw):
        if event in self.EVENTS:
            self.seconds += duration
            self.events += 1

    def mark(self):
        return self.seconds, self.events


class JaxShapeBench:
    """One (batch, prompt) shape for every JAX variant: compile, warm up, then timed rounds."""

    def __init__(self, variants, cfg, b, t, steps, seed, watch: CompileWatch, probe: BandwidthProbe):
        import jax
        import jax.numpy as jnp

        from deltamem_jax.decoding import left_pad
        from deltamem_jax.state import MemoryState
        from models.decoder import KVCache

        self.jax, self.jnp, self.watch, self.probe = jax, jnp, watch, probe
        self.variants, self.cfg, self.b, self.t, self.steps = variants, cfg, b, t, steps
        ids = prompt_ids(seed, b, t, cfg.vocab_size)
        self.tokens, self.positions, self.valid = left_pad(ids.tolist(), t)
        self.cache_len = t + steps
        # prefill does not donate: one empty cache / zero memory per variant serves every call
        self.cache = KVCache.create(cfg, b, self.cache_len)
        self.memory = {
            n: None if c is None else MemoryState.zeros(cfg.num_layers, b, c) for n, (_, c) in variants.items()
        }
        self.state0 = {}
        self.rec = {
            n: {"prefill_runs_s": [], "decode_runs_s": [], "bandwidth_runs_bytes_per_s": [],
                "discarded_runs_with_compilation": 0, "cache_len": self.cache_len}
            for n in variants
        }
        jax.block_until_ready((self.tokens, self.positions, self.valid, self.cache, self.memory))

    def bytes_per_step(self, name) -> int:
        """Bytes one decode step must stream: every weight once (the embedding as the tied
        LM head; an untied embedding is only gathered) plus the KV cache it attends over."""
        from flax import nnx

        model, _ = self.variants[name]
        params = nnx.state(model, nnx.Param)
        total = sum(x.nbytes for x in self.jax.tree.leaves(params))
        if not self.cfg.tie_word_embeddings:
            total -= model.embed[...].nbytes
        kv = 2 * self.cfg.num_layers * self.b * self.cfg.num_kv_heads * self.cfg.head_dim * self.t * 4
        return total + kv

    def _timed(self, fn):
        """(seconds, result, compile seconds that happened inside the call)."""
        c0, _ = self.watch.mark()
        t0 = time.perf_counter()
        out = fn()
        self.jax.block_until_ready(out)
        dt = time.perf_counter() - t0
        return dt, out, self.watch.mark()[0] - c0

    def _prefill(self, name):
        from deltamem_jax.decoding import prefill

        model, _ = self.variants[name]
        base = rss_bytes("VmRSS")
        peak_rss_reset()
        out = self._timed(lambda: prefill(model, self.tokens, self.positions, self.valid, self.cache, self.memory[name]))
        rec = self.rec[name]
        rec["prefill_peak_rss_bytes"] = max(rec.get("prefill_peak_rss_bytes") or 0, rss_bytes() or 0) or None
        rec.setdefault("rss_before_prefill_bytes", base)
        return out

    def _decode(self, name):
        from deltamem_jax.decoding import decode, scan_layers_default

        model, _ = self.variants[name]
        state = self.jax.tree.map(lambda a: a.copy(), self.state0[name])  # decode donates its state
        if not (scan_layers_default() if SCAN_LAYERS[0] is None else SCAN_LAYERS[0]):
            state = state.replace(cache=state.cache.unstack())  # as every call of a stream after its first finds it
        self.jax.block_until_ready(state)
        return self._timed(lambda: decode(model, state, self.steps, scan_layers=SCAN_LAYERS[0]))

    def compile_prefill(self, name):
        """Ahead-of-time compile of prefill's jitted forward (fills the jit cache).

        Best effort (it reaches into `deltamem_jax.forward._forward_jitted`): should the call
        path differ, the first timed prefill compiles instead, is detected by the
        CompileWatch, discarded and rerun.
        """
        from flax import nnx

        from deltamem_jax.forward import _forward_jitted, placed_shardings
        from deltamem_jax.state import WriteControl

        from deltamem_jax.decoding import PREFILL_SEGMENT

        model, _ = self.variants[name]
        c0, _ = self.watch.mark()
        try:
            g, p = nnx.split(model)
            for start in range(0, self.t, PREFILL_SEGMENT):  # one forward per prefill segment
                piece = slice(start, start + PREFILL_SEGMENT)
                _forward_jitted().lower(g, p, self.tokens[:, piece], self.positions[:, piece], self.valid[:, piece], self.cache,
                               None, self.memory[name], WriteControl(), start > 0, True,
                               placed_shardings((self.cache, self.memory[name]))).compile()
        except Exception as e:  # noqa: BLE001
            self.rec[name]["prefill_compile_note"] = f"AOT compile failed ({type(e).__name__}: {e})"
            print(f"warning: {name}: {self.rec[name]['prefill_compile_note']}; its first timed prefill compiles "
                  "and is rerun, which costs time", flush=True)
        self.rec[name]["prefill_compile_s"] = self.watch.mark()[0] - c0

    def warm_eager(self):
        """Compiles prefill's small eager (un-jitted) ops for this shape, cheaply.

        `prefill` runs a few eager ops after its jitted forward (next positions, the last
        logits row, ...); they compile on first use per shape. Running `prefill` once on a
        1-layer, 16-wide decoder with the same vocabulary and the same (batch, prompt)
        shape compiles exactly those ops at a tiny cost, so that no timed prefill pays it.
        """
        import dataclasses

        from flax import nnx

        from deltamem_jax.decoding import prefill
        from models.decoder import Decoder, KVCache

        tiny_cfg = dataclasses.replace(self.cfg, num_layers=1, hidden_size=16, intermediate_size=16, num_heads=1,
                                       num_kv_heads=1, head_dim=16, rope_layers=(True,))
        tiny = Decoder(tiny_cfg, nnx.Rngs(0))
        cache = KVCache.create(tiny_cfg, self.b, self.cache_len)
        dt, _, _ = self._timed(lambda: prefill(tiny, self.tokens, self.positions, self.valid, cache, None))
        return dt

    def warm_prefill(self, name):
        """One untimed prefill: the first prefill of a shape touches its activations' memory
        for the first time (page faults), which made it 1.1–1.6 s slower at b=8 T=512 in
        three runs; with one timed run per variant, the first variant would pay that alone."""
        self._prefill(name)

    def _clean(self, name, what, call):
        """A timed call that did not compile anything (retried once, then recorded as is)."""
        for _ in range(2):
            dt, out, compiled = call()
            if compiled < 0.01:
                return dt, out
            self.rec[name]["discarded_runs_with_compilation"] += 1
            self.rec[name].setdefault(f"{what}_compile_s_in_timed_calls", 0.0)
            self.rec[name][f"{what}_compile_s_in_timed_calls"] += compiled
        return dt, out

    def round(self, name, do_prefill=True):
        if do_prefill:
            dt, state = self._clean(name, "prefill", lambda: self._prefill(name))
            self.rec[name]["prefill_runs_s"].append(dt)
            if name not in self.state0:
                self.state0[name] = state
            del state
        if "decode_first_call_s" not in self.rec[name]:  # warm-up call: compiles decode
            dt, _, compiled = self._decode(name)
            self.rec[name]["decode_first_call_s"] = dt
            self.rec[name]["decode_compile_s"] = compiled
        self.rec[name]["bandwidth_runs_bytes_per_s"].append(self.probe()["bytes_per_s"])
        dt, _ = self._clean(name, "decode", lambda: self._decode(name))
        self.rec[name]["decode_runs_s"].append(dt)

    def finish(self):
        for r in self.rec.values():
            r["prefill_s"] = min(r["prefill_runs_s"]) if r["prefill_runs_s"] else None
            r["decode_s"] = min(r["decode_runs_s"])
            r["decode_median_s"] = statistics.median(r["decode_runs_s"])
            r["decode_steps"] = self.steps
            r["decode_tok_s"] = self.b * self.steps / r["decode_s"]
        for n, r in self.rec.items():
            r["decode_bytes_per_step"] = self.bytes_per_step(n)
        self.state0.clear()
        return self.rec


class BandwidthProbe:
    """Bytes/s a plain jitted `x @ W` streams here: W float32 [576, 49152] (the SmolLM2 LM
    head, 113 MB, far larger than the caches), x [1, 576]; best of `repeats` calls.

    The bandwidth this machine gives a process swings between moments (29–46 GB/s in six
    probes a few seconds apart on the AMD EPYC), so each timed decode round is paired with
    a probe taken just before it, and a decode's fraction of the roofline is the median
    over its rounds of decode bytes/s ÷ that round's probe."""

    def __init__(self):
        import jax
        import jax.numpy as jnp

        self.jax = jax
        self.w = jax.random.normal(jax.random.key(0), (576, 49152), jnp.float32)
        self.x = jnp.ones((1, 576), jnp.float32)
        self.f = jax.jit(lambda x, w: x @ w)
        jax.block_until_ready(self.f(self.x, self.w))

    def __call__(self, repeats: int = 10) -> dict:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.jax.block_until_ready(self.f(self.x, self.w))
            times.append(time.perf_counter() - t0)
        best = min(times)
        return {"bytes_per_s": self.w.nbytes / best, "matvec_s": best, "weight_bytes": self.w.nbytes,
                "method": "jitted x @ W, W float32 [576, 49152], x [1, 576], best of %d" % repeats}


# ------------------------------------------------------------------------ report


def fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def roofline_fraction(rec) -> float:
    """Achieved bytes/s of a decode (steps/s × bytes per step) ÷ the bandwidth probed just
    before the same round; the median over the rounds."""
    per_round = [rec["decode_steps"] / s * rec["decode_bytes_per_step"] / bw
                 for s, bw in zip(rec["decode_runs_s"], rec["bandwidth_runs_bytes_per_s"], strict=True)]
    return statistics.median(per_round)


def compute_ratios(res, grid):
    ratios = {"decode_deltamem_vs_plain": {}, "prefill_deltamem_vs_plain": {}, "decode_ours_vs_torch": {},
              "decode_deltamem_vs_plain_median_of_rounds": {}, "prefill_ours_vs_torch": {},
              "decode_fraction_of_roofline": {}}
    for b, t in grid:
        k = shape_key(b, t)
        plain = res["jax"]["plain"][k]
        for v in ("plain", "tsw", "msw"):
            ratios["decode_fraction_of_roofline"][f"{v}/{k}"] = roofline_fraction(res["jax"][v][k])
        for v in ("tsw", "msw"):
            r = res["jax"][v][k]
            ratios["decode_deltamem_vs_plain"][f"{v}/{k}"] = r["decode_tok_s"] / plain["decode_tok_s"]
            ratios["decode_deltamem_vs_plain_median_of_rounds"][f"{v}/{k}"] = plain["decode_median_s"] / r["decode_median_s"]
            if r["prefill_s"] and plain["prefill_s"]:
                ratios["prefill_deltamem_vs_plain"][f"{v}/{k}"] = r["prefill_s"] / plain["prefill_s"]
        tr = res.get("torch", {}).get(k)
        if tr and tr.get("ok"):
            ratios["decode_ours_vs_torch"][k] = plain["decode_tok_s"] / tr["decode_tok_s"]
            ratios["prefill_ours_vs_torch"][k] = plain["prefill_s"] / tr["prefill_s"]
    b1 = {n: v for n, v in ratios["decode_fraction_of_roofline"].items() if n.startswith("plain/b1_")}
    pick = {  # worst case of each target: (ratios key, min or max)
        "decode_ratio_deltamem_vs_plain": ("decode_deltamem_vs_plain", min),
        "prefill_ratio_deltamem_vs_plain": ("prefill_deltamem_vs_plain", max),
        "decode_ratio_ours_vs_torch": ("decode_ours_vs_torch", min),
        "prefill_ratio_ours_vs_torch": ("prefill_ours_vs_torch", max),
        "decode_fraction_of_roofline_b1": (None, min),
    }
    worst, where = {}, {}
    for key, (src, f) in pick.items():
        d = b1 if src is None else ratios[src]
        where[key] = f(d, key=d.get, default=None)
        worst[key] = None if where[key] is None else d[where[key]]
    return ratios, worst, where


def _foreign_by_window(res):
    out = {f"jax {k}": v.get("other_processes_cpu_cores_during_jax_rounds") for k, v in res.get("per_shape", {}).items()}
    out.update({f"torch {k}": v.get("other_processes_cpu_cores") for k, v in res.get("torch", {}).items() if v.get("ok")})
    return out


def _mib(x):
    return "—" if not x else f"{x / 2**20:.0f}"


def print_report(res, grid, ratios, worst, where):
    print()
    print("| shape | engine | prefill s | prefill peak RSS MiB (+Δ) | prefill compile s | decode tok/s | decode ms/step "
          "| % of roofline | decode compile s | δ/plain decode | δ/plain prefill | other procs (cores) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b, t in grid:
        k = shape_key(b, t)
        for v in ("plain", "tsw", "msw"):
            r = res["jax"][v][k]
            dr = ratios["decode_deltamem_vs_plain"].get(f"{v}/{k}")
            pr = ratios["prefill_deltamem_vs_plain"].get(f"{v}/{k}")
            roof = ratios["decode_fraction_of_roofline"].get(f"{v}/{k}")
            peak, base = r.get("prefill_peak_rss_bytes"), r.get("rss_before_prefill_bytes")
            delta = f" (+{_mib(peak - base)})" if peak and base else ""
            print(f"| b={b} T={t} | jax/{v} | {fmt(r['prefill_s'], '.3f')} | {_mib(peak)}{delta} "
                  f"| {fmt(r.get('prefill_compile_s'), '.1f')} "
                  f"| {r['decode_tok_s']:.1f} | {1000 * r['decode_s'] / r['decode_steps']:.1f} | {fmt(100 * roof, '.0f')}% "
                  f"| {fmt(r.get('decode_compile_s'), '.1f')} | {fmt(dr, '.3f')} | {fmt(pr, '.3f')} "
                  f"| {fmt(r.get('other_processes_cpu_cores'))} |")
        tr = res.get("torch", {}).get(k)
        if tr is None:
            print(f"| b={b} T={t} | torch | not measured | | | | | | | | | |")
        elif not tr.get("ok"):
            print(f"| b={b} T={t} | torch | failed: {tr.get('reason')} | | | | | | | | | |")
        else:
            peak, base = tr.get("prefill_peak_rss_bytes"), tr.get("rss_before_bytes")
            delta = f" (+{_mib(peak - base)})" if peak and base else ""
            print(f"| b={b} T={t} | torch | {tr['prefill_s']:.3f} | {_mib(peak)}{delta} | n/a | {tr['decode_tok_s']:.1f} "
                  f"| {1000 * tr['decode_s'] / tr['decode_steps']:.1f} | | n/a | | | {fmt(tr.get('other_processes_cpu_cores'))} |")
    if ratios["decode_ours_vs_torch"]:
        print()
        print("ours (jax/plain) ÷ torch, decode tok/s: " + ", ".join(f"{k} {v:.2f}×" for k, v in ratios["decode_ours_vs_torch"].items()))
        print("ours (jax/plain) ÷ torch, prefill s:    " + ", ".join(f"{k} {v:.2f}×" for k, v in ratios["prefill_ours_vs_torch"].items()))
    med = ratios["decode_deltamem_vs_plain_median_of_rounds"]
    if med:
        k = min(med, key=med.get)
        print(f"cross-check, δ-mem ÷ plain decode from the MEDIAN of the rounds (less sensitive to one lucky or "
              f"unlucky run): worst {med[k]:.3f} ({k}); all: " + ", ".join(f"{n} {v:.3f}" for n, v in med.items()))
    print()
    print("| worst case | value | where | target | pass |")
    print("|---|---:|---|---|---|")
    for key, (op, target) in TARGETS.items():
        v = worst[key]
        ok = None if v is None else (v >= target if op == ">=" else v <= target)
        print(f"| {key} | {fmt(v, '.3f')} | {where[key] or '—'} | {op} {target} | {'—' if ok is None else ('PASS' if ok else 'FAIL')} |")


def machine_info():
    import jax
    import jaxlib

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    try:  # the library changes often: record which version was measured (read-only git calls)
        info["repo_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                             text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["repo_uncommitted_changes"] = dirty.splitlines() if dirty else []
    except (OSError, subprocess.SubprocessError):
        info["repo_commit"] = None
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu_model"] = names[0] if names else None
    except OSError:
        pass
    return info


def loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


class CpuMeter:
    """CPU time that OTHER processes used during a window, in cores (Linux /proc).

    (all busy CPU time − this process − the torch worker) / wall time. On a shared
    machine this says how much the figures of the window were disturbed; ~0 = quiet.
    """

    TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self, pids=()):
        self.pids = [os.getpid(), *pids]
        self.start = self._snap()

    def _snap(self):
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            busy = sum(v[:8]) - v[3] - v[4]  # user nice system [idle iowait] irq softirq steal
            ours = 0
            for pid in self.pids:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                ours += int(fields[11]) + int(fields[12])  # utime + stime
            return time.perf_counter(), busy, ours
        except (OSError, ValueError, IndexError):
            return None

    def foreign_cores(self):
        end = self._snap()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return None
        other = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return max(0.0, other / self.TICK / (end[0] - self.start[0]))


# ------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced grid (< 5 min on a 2-core CPU)")
    ap.add_argument("--json", type=Path, help="write every figure, the ratios and machine info here")
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers/PyTorch column")
    ap.add_argument("--steps", type=int, help="decode steps per timed call (default 16 quick / 64 full)")
    ap.add_argument("--repeats", type=int,
                    help="timed rounds per figure, decode and prefill alike (default: decode 5 quick / 6 full; "
                         "prefill 2/1/1 quick, 3/2/2/1 full)")
    ap.add_argument("--layers", choices=["auto", "scan", "buffers"], default="auto",
                    help="decode over stacked layers with a scan, or over per-layer weight buffers "
                         "(auto: deltamem_jax.decoding.scan_layers_default())")
    ap.add_argument("--long", action="store_true",
                    help=f"only the long-prompt cell: b=1, T={LONG_T} (8,192-token window − 16 decode steps)")
    ap.add_argument("--_torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._torch_worker:
        torch_worker()
        return 0

    t_start = time.perf_counter()
    SCAN_LAYERS[0] = {"auto": None, "scan": True, "buffers": False}[args.layers]
    if args.long:
        grid = [(1, LONG_T)]
        torch_grid = set(grid)
        steps, repeats, torch_repeats = args.steps or 16, args.repeats or 2, 1
        prefill_repeats = {(1, LONG_T): 1}
    elif args.quick:
        grid = [(1, 512), (8, 512), (1, 2048)]
        torch_grid = {(1, 512), (8, 512), (1, 2048)}
        steps, repeats, torch_repeats = args.steps or 16, args.repeats or 5, 2
        # two timed prefills per variant at b=1 T=2048 (the prompt length of the ours ÷ torch
        # prefill target; torch's generate runs twice too, so neither side has more tries);
        # one at b=8 T=512 (6–8 s each), which the 5-minute limit cannot afford twice on a
        # slow day, after an untimed one (`warm_prefill`)
        prefill_repeats = {(1, 512): 3, (8, 512): 1, (1, 2048): 2}
    else:
        grid = [(1, 512), (8, 512), (1, 2048), (8, 2048)]
        torch_grid = set(grid)
        steps, repeats, torch_repeats = args.steps or 64, args.repeats or 6, 2
        prefill_repeats = {(1, 512): 3, (8, 512): 2, (1, 2048): 2, (8, 2048): 1}
    if args.repeats:
        prefill_repeats = {}

    torch_client = None
    if not args.no_torch:
        torch_client = TorchClient()  # builds its model while JAX loads the GGUF too

    import jax

    from models.loading import load_gguf

    warnings.filterwarnings("ignore", message=".*donat.*")
    info = machine_info()
    info["loadavg_start"] = loadavg()
    t0 = time.perf_counter()
    model, cfg, _tok = load_gguf(dtype="float32")
    variants = build_variants(model)
    jax_load_s = time.perf_counter() - t0
    print(f"jax {jax.__version__} on {info['cpu_count']} CPUs ({info.get('cpu_model')}), repo at "
          f"{info.get('repo_commit')}{' + uncommitted changes' if info.get('repo_uncommitted_changes') else ''}; "
          f"model loaded in {jax_load_s:.1f}s "
          f"(load average {info['loadavg_start']})", flush=True)

    res = {"jax": {v: {} for v in variants}, "torch": {}, "per_shape": {}}
    torch_reason = "disabled with --no-torch" if args.no_torch else None
    if torch_client is not None:
        if torch_client.wait_ready():
            info["torch"] = {k: torch_client.info[k] for k in ("torch", "transformers", "threads", "attn_implementation")}
            print(f"torch {torch_client.info['torch']} / transformers {torch_client.info['transformers']} "
                  f"built its model from the GGUF in {torch_client.info['load_s']:.1f}s", flush=True)
        else:
            torch_reason = torch_client.reason
    if torch_reason:
        print(f"torch column skipped: {torch_reason}", flush=True)

    names = list(variants)
    watch = CompileWatch()
    probe = BandwidthProbe()
    bandwidth = probe(30)
    print(f"bandwidth of a plain x @ W here: {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s ({bandwidth['method']}; "
          "probed again before every timed decode round)", flush=True)
    measured = []

    for b, t in grid:
        k = shape_key(b, t)
        seed = 1000 * b + t
        measured.append((b, t))
        ts = time.perf_counter()
        sb = JaxShapeBench(variants, cfg, b, t, steps, seed, watch, probe)
        for n in names:
            sb.compile_prefill(n)
        load_before = loadavg()
        eager_warmup_s = sb.warm_eager()
        p_reps = min(prefill_repeats.get((b, t), repeats), repeats)
        if p_reps == 1:
            sb.warm_prefill(names[0])
        meter = CpuMeter([torch_client.proc.pid] if torch_client and torch_client.proc.poll() is None else [])
        for r in range(repeats):
            for n in names[r % len(names):] + names[: r % len(names)]:
                sb.round(n, do_prefill=r < p_reps)
        jax_foreign = meter.foreign_cores()
        for n, rec in sb.finish().items():
            res["jax"][n][k] = rec
        res["per_shape"][k] = {
            "cache_len": sb.cache_len, "prefill_timed_runs": p_reps, "decode_timed_runs": repeats,
            "eager_warmup_s": eager_warmup_s, "loadavg_before": load_before, "loadavg_after": loadavg(),
            "jax_seconds": time.perf_counter() - ts,
            "other_processes_cpu_cores_during_jax_rounds": jax_foreign,
        }
        for n in names:
            res["jax"][n][k]["other_processes_cpu_cores"] = jax_foreign
        line = ", ".join(
            f"{n} {res['jax'][n][k]['decode_tok_s']:.1f} tok/s / prefill {res['jax'][n][k]['prefill_s']:.2f}s" for n in names
        )
        print(f"[{time.perf_counter() - t_start:6.1f}s] {k}: {line} (shape took {time.perf_counter() - ts:.0f}s; "
              f"other processes used {fmt(jax_foreign)} cores)", flush=True)
        del sb
        if torch_reason is None and (b, t) in torch_grid:
            ts = time.perf_counter()
            meter = CpuMeter([torch_client.proc.pid])
            tr = torch_client.measure(b=b, t=t, steps=steps, seed=seed, repeats=torch_repeats, vocab=cfg.vocab_size)
            tr["other_processes_cpu_cores"] = meter.foreign_cores()
            res["torch"][k] = tr
            if tr.get("ok"):
                print(f"[{time.perf_counter() - t_start:6.1f}s] {k}: torch {tr['decode_tok_s']:.1f} tok/s / prefill "
                      f"{tr['prefill_s']:.2f}s (took {time.perf_counter() - ts:.0f}s; other processes used "
                      f"{fmt(tr['other_processes_cpu_cores'])} cores)", flush=True)
            else:
                print(f"torch {k} failed: {tr.get('reason')}", flush=True)
        elif torch_reason is not None:
            res["torch"][k] = {"ok": False, "reason": torch_reason}
    if torch_client is not None:
        torch_client.close()
    again = probe(30)
    rounds = [bw for per_v in res["jax"].values() for rec in per_v.values() for bw in rec["bandwidth_runs_bytes_per_s"]]
    print(f"bandwidth of a plain x @ W at the end: {again['bytes_per_s'] / 1e9:.1f} GB/s; over the decode rounds' "
          f"probes {min(rounds) / 1e9:.1f}–{max(rounds) / 1e9:.1f} GB/s", flush=True)
    bandwidth |= {"start_bytes_per_s": bandwidth["bytes_per_s"], "end_bytes_per_s": again["bytes_per_s"],
                  "rounds_min_bytes_per_s": min(rounds), "rounds_max_bytes_per_s": max(rounds),
                  "roofline": "per decode round, a probe (best of 10 calls) just before it; fraction = median over "
                              "rounds of decode bytes/s ÷ that probe"}
    del bandwidth["bytes_per_s"]

    ratios, worst, where = compute_ratios(res, measured)
    elapsed = time.perf_counter() - t_start
    info["loadavg_end"] = loadavg()
    print_report(res, measured, ratios, worst, where)
    print(f"\nMethod: decode {steps} steps per timed call; JAX figures are the best of {repeats} interleaved "
          f"decode rounds and of {', '.join(f'{shape_key(*g)}: {min(prefill_repeats.get(g, repeats), repeats)}' for g in measured)} "
          f"prefill runs per variant; torch best of {torch_repeats} generate() call(s), timed by per-forward "
          f"LogitsProcessor stamps (prefill = to first stamp, decode = first→last stamp / {steps}).")
    print(f"load average start {info['loadavg_start']} end {info['loadavg_end']}.")
    noisy = {k: v for k, v in _foreign_by_window(res).items() if v is not None and v > 0.25}
    if noisy:
        print("WARNING: other processes used CPU during these windows (cores): "
              + ", ".join(f"{k} {v:.2f}" for k, v in noisy.items())
              + f" of {info['cpu_count']}; those figures are disturbed (torch's OpenMP decode suffers most).")
    print(f"elapsed {elapsed:.1f}s")
    quick_ok = None
    if args.quick:
        quick_ok = elapsed <= QUICK_LIMIT_S
        print(f"--quick measured all {len(measured)} cells in {elapsed:.0f} s: "
              f"{'within' if quick_ok else 'OVER'} the {QUICK_LIMIT_S} s limit")

    if args.json:
        out = {
            **worst,
            "worst_case_where": where,
            "decode_ratio_deltamem_vs_plain_median_of_rounds": min(
                ratios["decode_deltamem_vs_plain_median_of_rounds"].values(), default=None),
            "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
            "pass": {k: None if worst[k] is None else (worst[k] >= v if op == ">=" else worst[k] <= v)
                     for k, (op, v) in TARGETS.items()},
            "ratios": ratios,
            "bandwidth": bandwidth,
            "results": res,
            "machine": info,
            "settings": {
                "quick": args.quick,
                "model": "SmolLM2-135M-Instruct (embedded GGUF, dequantized to float32)",
                "grid": [list(g) for g in grid],
                "measured_grid": [list(g) for g in measured],
                "long": args.long,
                "layers": args.layers,
                "quick_limit_s": QUICK_LIMIT_S if args.quick else None,
                "quick_within_limit": quick_ok,
                "torch_grid": sorted(list(g) for g in torch_grid),
                "decode_steps": steps,
                "decode_repeats": repeats,
                "prefill_repeats": {shape_key(*g): min(prefill_repeats.get(g, repeats), repeats) for g in measured},
                "torch_repeats": torch_repeats,
                "torch_skipped_reason": torch_reason,
                "variants": {"plain": "no δ-mem (memory=None)", "tsw": "DeltaMemConfig()", "msw": "DeltaMemConfig(num_state_heads=4)"},
                "methods": {
                    "jax_prefill": "wall time of generate.prefill() to block_until_ready, after AOT compile of its jitted forward",
                    "jax_decode": "wall time of generate.decode(model, state, steps) on a copy of the post-prefill state, "
                                  "after 1 warm-up call; tok/s = batch*steps/time; cache length = prompt + steps",
                    "compile_s": "JAX trace+lowering+XLA compile seconds from jax.monitoring events; timed calls that "
                                 "compiled anything are discarded and rerun",
                    "torch_prefill": "generate(): first LogitsProcessor timestamp - generate start",
                    "torch_decode": "generate(max_new_tokens=min_new_tokens=steps+1): (last - first LogitsProcessor timestamp)/steps "
                                    "per step; tok/s = batch/per-step time",
                    "best_of": "minimum time over the repeats; JAX variants interleaved per round (rotating order)",
                    "other_processes_cpu_cores": "CPU time used by processes other than this benchmark during the "
                                                 "window (from /proc), in cores; > ~0.25 means disturbed figures",
                },
                "jax_load_s": jax_load_s,
            },
            "elapsed_s": elapsed,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
