"""One tiny model, prompts and training batch, run on one device or on a mesh, for the
multi-device and multi-process tests (`test_sharding.py`, `test_multiprocess.py`).

`run(mesh)` does everything the sharded paths must agree on: parameters created (already
sharded on a mesh), a prefill and a decode loop with δ-mem, and four micro-steps of the
train step (two updates, gradients accumulated over two micro-batches). It returns every result as NumPy (gathered from all processes)
plus the shardings it observed, so the caller compares against `run(None)`.

Every input is a pure function of its row index (`prompt_rows`, `train_rows`), so each
process can build only its own rows and the global batch still equals the one-device one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import deltamem_jax
import models
from deltamem_jax import decoding
from deltamem_jax.sharding import created, gather, memory_shardings
from deltamem_jax.state import MemoryState, WriteControl
from deltamem_jax.training.batches import Batch, Segment
from deltamem_jax.training.sharded import init_opt_state, make_sharded_train_step, process_batch, train_shardings
from deltamem_jax.training.step import OptimConfig, make_optimizer, make_train_step, split_model
from models.config import ModelConfig
from models.decoder import KVCache
from models.sharding import ShardingRules, cache_shardings, create_sharded

# Every model-parallel dimension divides by 4: heads 4, KV heads 4, mlp 128, vocab 256.
CFG = ModelConfig(
    family="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=4, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
    qkv_bias=True, o_bias=True, mlp_bias=True, qk_norm=True,
)  # fmt: skip
MEMORY = deltamem_jax.DeltaMemConfig(output_init="random")
B = 8  # batch rows: divides every data axis tested (8, 4, 2)
PROMPT, STEPS = 16, 4  # prompt tokens, decode steps
SYS, TURNS, TURN, READ, ANSWER = 8, 2, 8, 16, 4  # training layout (session protocol)
# Two micro-batches per update: after the first micro-step the optimizer state holds that
# step's gradients (`acc_grads`), so one compiled step gives both gradients and updates.
# Update 1 has learning rate 0 (warmup), update 2 moves the parameters.
OPTIM = OptimConfig(learning_rate=1e-2, steps=2, warmup=0.0, accumulate=2)
MICRO_STEPS = 4

ROWS_BUILT: list[tuple[str, int, int]] = []  # (what, start, count) of every row range built here


def build() -> models.Decoder:
    """The tiny backbone with random weights (norms around 1, biases around 0, large
    enough that attention is not uniform) and δ-mem whose output changes the logits."""
    model = models.Decoder(CFG, nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(1), len(flat))
    new = []
    for (path, x), key in zip(flat, keys):
        name = jax.tree_util.keystr(path)
        noise = jax.random.normal(key, x.shape, x.dtype)
        new.append(1.0 + 0.2 * noise if "norm" in name else 0.2 * noise if "bias" in name else 0.1 * noise)
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return deltamem_jax.attach(model, MEMORY)


def _left_padded(rng, length: int, n_min: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = int(rng.integers(n_min, length + 1))
    tokens = np.zeros(length, np.int32)
    tokens[length - n :] = rng.integers(0, CFG.vocab_size, n)
    valid = np.arange(length) >= length - n
    positions = np.clip(np.cumsum(valid) - 1, 0, None).astype(np.int32)
    return tokens, positions, valid


def prompt_rows(start: int, count: int):
    """Prompt rows [start, start+count): left-padded tokens, positions, validity [count, PROMPT]."""
    ROWS_BUILT.append(("prompt", start, count))
    rows = [_left_padded(np.random.default_rng(1000 + i), PROMPT, 4) for i in range(start, start + count)]
    return tuple(np.stack(a) for a in zip(*rows))


def train_rows(start: int, count: int) -> Batch:
    """Training rows [start, start+count) in the session protocol's layout (random tokens)."""
    ROWS_BUILT.append(("train", start, count))
    rows = []
    for i in range(start, start + count):
        rng = np.random.default_rng(2000 + i)
        system = _left_padded(rng, SYS, SYS)
        turns = [_left_padded(rng, TURN, 0 if t else 3) for t in range(TURNS)]  # a later turn may be empty
        turns = [(tk, np.where(v, p + SYS, 0).astype(np.int32), v) for tk, p, v in turns]
        read = _left_padded(rng, READ, ANSWER + 4)
        n_answer = int(rng.integers(1, ANSWER + 1))
        index = np.zeros(ANSWER, np.int32)
        index[:n_answer] = np.arange(READ - n_answer - 1, READ - 1)
        targets = np.zeros(ANSWER, np.int32)
        targets[:n_answer] = read[0][READ - n_answer :]
        mask = np.arange(ANSWER) < n_answer
        rows.append((system, turns, read, index, targets, mask, mask & (np.arange(ANSWER) >= n_answer // 2)))

    def seg(parts):
        return Segment(*(np.stack(a) for a in zip(*parts)))

    return Batch(
        system=seg([r[0] for r in rows]),
        turns=Segment(*(np.stack([np.stack([t[k] for t in r[1]]) for r in rows]) for k in range(3))),  # [b, T, t]
        history=None,
        read=seg([r[2] for r in rows]),
        target_index=np.stack([r[3] for r in rows]),
        targets=np.stack([r[4] for r in rows]),
        target_mask=np.stack([r[5] for r in rows]),
        value_mask=np.stack([r[6] for r in rows]),
    )


def _spec(x) -> list | None:
    s = getattr(x.sharding, "spec", None)
    return None if s is None else [None if a is None else str(a) for a in s]


def run(mesh=None, rules: ShardingRules = ShardingRules()) -> dict:
    """Everything on `mesh` (None: one device). Returns {"values": {name: ndarray},
    "specs": {...}, "same_sharding": {...}} (the last two only on a mesh)."""
    values, specs, same = {}, {}, {}
    L = CFG.num_layers
    if mesh is None:
        model = build()
        tokens, positions, valid = (jnp.asarray(a) for a in prompt_rows(0, B))
        cache = KVCache.create(CFG, B, PROMPT + STEPS)
        memory = MemoryState.zeros(L, B, MEMORY)
    else:
        model = create_sharded(build, mesh, rules)
        tokens, positions, valid = process_batch(prompt_rows, B, mesh, rules)
        cache = created(lambda: KVCache.create(CFG, B, PROMPT + STEPS), lambda c: cache_shardings(c, mesh, rules))
        memory = created(lambda: MemoryState.zeros(L, B, MEMORY), lambda m: memory_shardings(m, mesh, rules))
    attn = model.layers.attn
    for name, x in {"q_proj": attn.base.q_proj[...], "k_proj": attn.base.k_proj[...], "embed": model.embed[...],
                    "mlp_gate": model.layers.mlp.gate_proj[...], "memory_in_proj": attn.memory.in_proj[...],
                    "delta_q": attn.memory.delta_q[...], "memory_state": memory.S, "cache_k": cache.k}.items():  # fmt: skip
        specs[name] = _spec(x)
    keep = values.update  # of NumPy copies (gathered): decode and the train step donate their inputs
    keep(gather({"delta_q_init": attn.memory.delta_q[...], "q_proj_init": attn.base.q_proj[...]}))
    placed = (cache, memory)

    # prefill (memory written) and a greedy decode loop (every token written)
    state = decoding.prefill(model, tokens, positions, valid, cache, memory, WriteControl(), jax.random.PRNGKey(0))
    keep(gather({"prefill_logits": state.logits, "prefill_memory": state.memory.S}))
    after_prefill = (state.cache, state.memory)
    state, out_tokens, live = decoding.decode(model, state, STEPS)
    keep(gather({"decode_tokens": out_tokens, "decode_logits": state.logits, "decode_memory": state.memory.S, "decode_cache_k": state.cache.k}))
    if mesh is not None:
        for name, before, now in (("prefill", placed, after_prefill), ("decode", placed, (state.cache, state.memory))):
            pairs = zip(jax.tree.leaves(before), jax.tree.leaves(now))
            same[name] = all(a.sharding.is_equivalent_to(b.sharding, a.ndim) for a, b in pairs)
        specs["memory_after_decode"] = _spec(state.memory.S)

    # training: micro-steps of the train step (gradient accumulation over 2)
    graphdef, params, frozen = split_model(model)
    tx = make_optimizer(OPTIM)
    if mesh is None:
        batch = jax.tree.map(jnp.asarray, train_rows(0, B))
        opt_state = tx.init(params)
        step = make_train_step(graphdef, tx, remat=True)
    else:
        batch = process_batch(train_rows, B, mesh, rules)
        sh = train_shardings(tx, params, frozen, batch, mesh, rules)
        opt_state = init_opt_state(tx, params, sh)
        step = make_sharded_train_step(graphdef, tx, sh, remat=True)
        specs["train_tokens"] = _spec(batch.read.tokens)
        specs["opt_mu_delta_q"] = _spec(opt_state.inner_opt_state[1][0].mu["layers"]["attn"]["memory"]["delta_q"][...])
    losses = []
    for i in range(MICRO_STEPS):
        params, opt_state, metrics = step(params, opt_state, frozen, batch)
        losses.append(metrics["loss"])
        if i == 0:  # the first micro-step's gradients, accumulated (not yet applied)
            grads = opt_state.acc_grads
            keep(gather({"grad" + jax.tree_util.keystr(p): g for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}))
    keep(gather({"losses": jnp.stack(losses)}))
    keep(gather({"params" + jax.tree_util.keystr(path): p for path, p in jax.tree_util.tree_flatten_with_path(params)[0]}))
    if mesh is not None:
        same["params_after_steps"] = all(
            p.sharding.is_equivalent_to(s, p.ndim) for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(sh.params, is_leaf=lambda x: hasattr(x, "spec")))
        )
        same["opt_state_after_steps"] = all(
            x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(jax.tree.leaves(opt_state), jax.tree.leaves(sh.opt_state, is_leaf=lambda x: hasattr(x, "spec")))
        )
    return {"values": values, "specs": specs, "same_sharding": same}


def compare(single: dict, sharded: dict) -> dict:
    """Max abs error and magnitude of every value (sharded vs one device)."""
    out = {}
    for k, v in single["values"].items():
        w = sharded["values"][k]
        out[k] = {"error": float(np.max(np.abs(v.astype(np.float64) - w))), "magnitude": float(np.max(np.abs(v))),
                  "finite": bool(np.isfinite(w).all()), "shape_ok": v.shape == w.shape}  # fmt: skip
    return out
