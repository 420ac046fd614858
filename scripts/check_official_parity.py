"""Parity with the official PyTorch δ-mem on one fixture folder.

    python scripts/check_official_parity.py --fixture ../shared/fixtures/official_tiny/tsw

The folder holds `backbone/` (HF config + safetensors), `adapter/` (official δ-mem
config + tensors) and `expected.npz`. Every scenario the npz holds is run: prefill with
writes (token or message-mean), token-by-token decode with the KV cache, a read-only
pass, a zero-state pass, and padding. Prints the max abs error of every compared array;
exits 1 if a logit differs by more than 1e-4 or a state by more than 1e-5.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from deltamem_jax import adapter
from deltamem_jax.config import WriteGranularity
from deltamem_jax.forward import forward
from deltamem_jax.state import MemoryState, WriteControl, WriteMode
from models.decoder import KVCache
from models.loading import load_pretrained

LOGIT_TOL, STATE_TOL = 1e-4, 1e-5


def run(fixture: Path, writer: str = "auto") -> list[tuple[str, float, float]]:
    """[(array name, max abs error, tolerance)] for every array the fixture holds."""
    model, cfg = load_pretrained(fixture / "backbone")
    config = dataclasses.replace(adapter.load_adapter(model, fixture / "adapter"), writer=writer)
    adapter.memory_of(model).config = config
    exp = dict(np.load(fixture / "expected.npz"))
    results = []

    def ours_state(mem: MemoryState, like: np.ndarray) -> np.ndarray:
        s = np.asarray(mem.S)  # [l, b, m, r, r]
        return s[:, :, 0] if like.ndim == 4 else s

    def compare(name, ours, tol, real=None):
        """real: [b, t] mask of real tokens (padding positions' logits are not compared)."""
        if name in exp:
            err = np.abs(np.asarray(ours) - exp[name])
            if real is not None:
                err = np.where(real[..., None], err, 0.0)
            results.append((name, float(np.max(err)), tol))

    def zeros(batch):
        return MemoryState.zeros(cfg.num_layers, batch, config)

    def positions_for(t, b, start=0):
        return jnp.broadcast_to(jnp.arange(start, start + t, dtype=jnp.int32), (b, t))

    if "prompt_ids" in exp:
        ids = jnp.asarray(exp["prompt_ids"], jnp.int32)
        b, t = ids.shape
        n_dec = exp["decode_input_ids"].shape[1] if "decode_input_ids" in exp else 0
        valid = jnp.asarray(exp.get("attention_mask", np.ones((b, t))) != 0)
        pos = jnp.asarray(exp["position_ids"], jnp.int32) if "position_ids" in exp else positions_for(t, b)
        if config.write_granularity == WriteGranularity.MESSAGE_MEAN and "message_ids" in exp:
            control = WriteControl.messages(jnp.asarray(exp["message_ids"], jnp.int32), valid)
        else:  # the official fallback: no message ids → per-token writes
            control = WriteControl(WriteMode.TOKENS)
        cache = KVCache.create(cfg, b, t + n_dec)
        logits, cache, mem = forward(model, ids, pos, valid, cache, zeros(b), control, attend_cache=False)
        compare("prefill_logits", logits, LOGIT_TOL, real=np.asarray(valid))
        compare("state_after_prefill", ours_state(mem, exp["state_after_prefill"]), STATE_TOL)

        if n_dec:
            dec = jnp.asarray(exp["decode_input_ids"], jnp.int32)
            step_logits = []
            for i in range(n_dec):
                lg, cache, mem = forward(
                    model, dec[:, i : i + 1], pos[:, -1:] + 1 + i, jnp.ones((b, 1), bool), cache, mem, WriteControl(WriteMode.TOKENS)
                )
                step_logits.append(lg)
            compare("decode_logits", jnp.concatenate(step_logits, 1), LOGIT_TOL)
            compare("state_after_decode", ours_state(mem, exp["state_after_decode"]), STATE_TOL)

        if "read_query_ids" in exp:
            rq = jnp.asarray(exp["read_query_ids"], jnp.int32)
            rb, rt = rq.shape
            read_only = WriteControl(WriteMode.READ_ONLY)
            ones = jnp.ones((rb, rt), bool)
            lg, _, mem_r = forward(model, rq, positions_for(rt, rb), ones, KVCache.create(cfg, rb, rt), mem, read_only, attend_cache=False)
            compare("read_logits", lg, LOGIT_TOL)
            compare("state_after_read", ours_state(mem_r, exp.get("state_after_read", np.zeros(4))), STATE_TOL)
            lg, _, _ = forward(model, rq, positions_for(rt, rb), ones, KVCache.create(cfg, rb, rt), zeros(rb), read_only, attend_cache=False)
            compare("read_logits_zero_state", lg, LOGIT_TOL)

        if "unpadded_row1_logits" in exp:
            row = ids[1:, t - exp["unpadded_row1_logits"].shape[1] :]
            rt = row.shape[1]
            lg, _, mem1 = forward(
                model, row, positions_for(rt, 1), jnp.ones((1, rt), bool), KVCache.create(cfg, 1, rt), zeros(1), WriteControl(WriteMode.TOKENS), attend_cache=False
            )
            compare("unpadded_row1_logits", lg, LOGIT_TOL)
            compare("unpadded_row1_state", ours_state(mem1, exp["unpadded_row1_state"]), STATE_TOL)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fixture", type=Path, required=True, help="a fixture folder (backbone/, adapter/, expected.npz)")
    p.add_argument("--writer", choices=["auto", "scan", "chunked"], default="auto", help="multi-token memory writer")
    args = p.parse_args(argv)
    for part in ("backbone", "adapter", "expected.npz"):
        if not (args.fixture / part).exists():
            print(f"error: {args.fixture} has no {part}", file=sys.stderr)
            return 2
    results = run(args.fixture, args.writer)
    failed = False
    for name, err, tol in results:
        ok = err <= tol
        failed |= not ok
        print(f"{name:28s} max abs err {err:.3e}  (tol {tol:.0e})  {'ok' if ok else 'FAIL'}")
    if not results:
        print("error: expected.npz holds no known scenario", file=sys.stderr)
        return 2
    print(f"{args.fixture}: {'FAIL' if failed else 'PASS'} ({len(results)} arrays)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
