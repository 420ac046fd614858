"""Per-token write gates of a told fact: how strongly each token is written into the memory.

With λ = 1 − β every written token also scales the old state by 1 − β, so a token whose
gate is near 1 wipes what earlier tokens (and earlier turns) wrote in that layer. This
prints, for each token of a `Session.remember` turn, the write gate averaged over the
state rows and over layers, its range over layers, and how many layers write it with
β > 0.5 (an overwrite).

    python scripts/gate_profile.py [--adapter DIR] "My dog is called Pixel." "My door code is 4821."
"""

from __future__ import annotations

import argparse

import deltamem_jax._xla_flags  # noqa: F401  (before JAX starts)
import jax.numpy as jnp
import numpy as np

from deltamem_jax import Session
from deltamem_jax.adapter import memory_of
from deltamem_jax.session import memory_only_turn
from deltamem_jax.state import MemoryState, WriteControl, WriteMode
from models.decoder import KVCache


def token_gates(session: Session, text: str) -> tuple[list[int], np.ndarray]:
    """The turn's token ids and the mean write gate of each token in each layer, [l, t].

    Row n of one batch writes the turn's first n+1 tokens (right-padded, padding writes
    nothing); the difference of consecutive rows' gate sums is token n's gate. Causal
    attention makes token n's gate independent of later tokens, as in the real write."""
    model, tok = session.model, session.tokenizer
    sys_ids, turn = memory_only_turn(tok, session.system_prompt, {"role": "user", "content": text}, False)
    n_sys, t = len(sys_ids), len(turn)
    tokens, valid = np.zeros((t, t), np.int32), np.zeros((t, t), bool)
    for n in range(t):
        tokens[n, : n + 1], valid[n, : n + 1] = turn[: n + 1], True
    positions = np.broadcast_to(np.arange(n_sys, n_sys + t, dtype=np.int32), (t, t))
    sys_tokens = np.broadcast_to(np.asarray(sys_ids, np.int32), (t, n_sys))
    sys_positions = np.broadcast_to(np.arange(n_sys, dtype=np.int32), (t, n_sys))
    memory = MemoryState.zeros(model.cfg.num_layers, t, memory_of(model).config, gate_stats=True)
    cache = KVCache.create(model.cfg, t, n_sys + t)
    _, cache, memory = model(jnp.asarray(sys_tokens), jnp.asarray(sys_positions), jnp.ones((t, n_sys), bool), cache, memory,
                             WriteControl(WriteMode.READ_ONLY), attend_cache=False, head=False)  # fmt: skip
    _, _, memory = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid), cache, memory,
                         WriteControl(WriteMode.TOKENS), head=False)  # fmt: skip
    sums = np.asarray(memory.gate_stats[:, :, 0])  # [l, t]: row n sums tokens 0..n
    return turn, np.diff(sums, axis=1, prepend=0.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("texts", nargs="+", help="facts, each written as one remembered turn")
    p.add_argument("--adapter", help="adapter folder (default: the shipped one)")
    a = p.parse_args(argv)
    session = Session.default(mode="memory-only", adapter=a.adapter)
    for text in a.texts:
        turn, beta = token_gates(session, text)
        print(f"{text!r}: {beta.shape[0]} layers; mean β over the turn {beta.mean():.3f}")
        print(f"{'token':>14}  mean β   min    max   layers β>0.5")
        for i, t in enumerate(turn):
            b = beta[:, i]
            print(f"{session.tokenizer.decode([t], skip_special_tokens=False)!r:>14}  {b.mean():.3f}  {b.min():.3f}  {b.max():.3f}  {(b > 0.5).sum():>5}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
