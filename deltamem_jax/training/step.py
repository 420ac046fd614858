"""The episode loss and the jitted train step (only `MemoryParam`s are differentiated).

The model is split into (graphdef, trainable memory parameters, frozen rest). The
frozen backbone goes into the compiled step as an ordinary argument, so XLA neither
constant-folds it nor differentiates it, and the optimizer never sees it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from deltamem_jax.adapter import memory_of
from deltamem_jax.memory import MemoryParam
from deltamem_jax.session import write_control
from deltamem_jax.state import MemoryState, WriteControl, WriteMode
from deltamem_jax.training.batches import Batch, Segment
from models.decoder import Decoder, KVCache

BETA_TARGET, BETA_WEIGHT = 0.05, 0.01  # official regularizer: 0.01 · mean_l (mean β_l − 0.05)²


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 2e-3
    steps: int = 1000  # optimizer updates
    warmup: float = 0.1  # fraction of steps
    weight_decay: float = 0.0
    clip: float = 1.0
    accumulate: int = 1  # micro-batches per update


def make_optimizer(c: OptimConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup + cosine decay and global-norm clipping (optionally accumulated)."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, c.learning_rate, max(1, int(c.warmup * c.steps)), max(c.steps, 2), end_value=0.1 * c.learning_rate
    )
    tx = optax.chain(optax.clip_by_global_norm(c.clip), optax.adamw(schedule, weight_decay=c.weight_decay))
    return optax.MultiSteps(tx, every_k_schedule=c.accumulate) if c.accumulate > 1 else tx


def split_model(model: Decoder) -> tuple[Any, nnx.State, nnx.State]:
    """(graphdef, trainable memory parameters, frozen rest of the model)."""
    return nnx.split(model, MemoryParam, ...)


def write_pass(model: Decoder, batch: Batch, memory: MemoryState, remat: bool) -> MemoryState:
    """Writes an episode's history into `memory` as its protocol says; no logits computed."""
    config = memory_of(model).config
    if batch.history is not None:  # official: the whole history in one pass
        h = batch.history
        cache = KVCache.create(model.cfg, h.tokens.shape[0], h.tokens.shape[1])
        _, _, memory = model(h.tokens, h.positions, h.valid, cache, memory, write_control(config, h.valid),
                             attend_cache=False, head=False, remat=remat)  # fmt: skip
        return memory
    sys = batch.system
    b, s = sys.tokens.shape

    def one_turn(memory: MemoryState, turn: Segment):
        # a fresh context per turn, as `Session` runs a memory-only `remember`
        cache = KVCache.create(model.cfg, b, s + turn.tokens.shape[1])
        _, cache, memory = model(sys.tokens, sys.positions, sys.valid, cache, memory, WriteControl(WriteMode.READ_ONLY),
                                 attend_cache=False, head=False, remat=remat)  # fmt: skip
        _, _, memory = model(turn.tokens, turn.positions, turn.valid, cache, memory, write_control(config, turn.valid),
                             head=False, remat=remat)  # fmt: skip
        return memory, None

    turns = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), batch.turns)  # [T, b, t]
    memory, _ = jax.lax.scan(one_turn, memory, turns)
    return memory


def answer_ce(model: Decoder, batch: Batch, memory: MemoryState | None, remat: bool) -> jax.Array:
    """Read pass (writes off) over system + question + answer: the cross-entropy of every
    answer target, [b, a] (padding included; mask it). Logits only at the answer positions."""
    r = batch.read
    cache = KVCache.create(model.cfg, r.tokens.shape[0], r.tokens.shape[1])
    hidden, _, _ = model(r.tokens, r.positions, r.valid, cache, memory, WriteControl(WriteMode.READ_ONLY),
                         attend_cache=False, head=False, remat=remat)  # fmt: skip
    return _target_ce(model, hidden, batch.target_index, batch.targets)


def _target_ce(model: Decoder, hidden: jax.Array, index: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy [b, a] of `targets` predicted at positions `index` of `hidden` [b, t, d]:
    vocabulary logits only where a target is."""
    picked = jnp.take_along_axis(hidden, index[..., None], axis=1)  # [b, a, d]
    return optax.softmax_cross_entropy_with_integer_labels(model.logits(picked), targets)


def context_ce(model: Decoder, batch: Batch, remat: bool) -> jax.Array:
    """The episode run as a context+memory conversation runs it: system + history +
    question + answer in one context, every token written into a fresh memory as it is
    read. The cross-entropy of every answer target, [b, a] (padding included; mask it)."""
    c = batch.context
    b, t = c.tokens.shape
    config = memory_of(model).config
    cache = KVCache.create(model.cfg, b, t)
    hidden, _, _ = model(c.tokens, c.positions, c.valid, cache, MemoryState.zeros(model.cfg.num_layers, b, config),
                         write_control(config, c.valid), attend_cache=False, head=False, remat=remat)  # fmt: skip
    return _target_ce(model, hidden, batch.context_index, batch.targets)


def target_weights(batch: Batch, value_weight: float) -> jax.Array:
    """[b, a] loss weights: 1 per answer token, `value_weight` per token of the told value.

    The answer's format ("Your dog's name is …") is learned from any non-empty memory
    within a few hundred episodes; only the value tokens need recall, so weighting them
    puts the gradient where the memory's content matters."""
    mask = batch.target_mask.astype(jnp.float32)
    return mask * (1.0 + (value_weight - 1.0) * batch.value_mask.astype(jnp.float32))


def _mean(ce: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1e-6)


def mean_beta(memory: MemoryState) -> jax.Array:
    """[l] each layer's write gate averaged over every token written in the batch."""
    sums = jnp.sum(memory.gate_stats, axis=1)  # [l, 2]
    return sums[:, 0] / jnp.maximum(sums[:, 1], 1.0)


def beta_penalty(memory: MemoryState, weight: float = BETA_WEIGHT) -> jax.Array:
    """The official regularizer: weight · mean over layers of (mean write gate − 0.05)².

    λ = 1 − β, so every written token scales the old state by 1 − β: a layer whose
    gates stay high forgets one turn within the next. The penalty is on the mean, so
    a few tokens (the told value) can still be written strongly."""
    return weight * jnp.mean((mean_beta(memory) - BETA_TARGET) ** 2)


def plain_kl(model: Decoder, plain: Segment, remat: bool) -> jax.Array:
    """Mean KL(frozen backbone ‖ δ-mem) of the next-token distribution over a transcript
    run as a context-and-memory conversation runs it: in the context and written into a
    fresh memory token by token (see `plain.py`)."""
    b, t = plain.tokens.shape
    config = memory_of(model).config

    def logits(memory, control):
        cache = KVCache.create(model.cfg, b, t)
        out, _, _ = model(plain.tokens, plain.positions, plain.valid, cache, memory, control, attend_cache=False, remat=remat)
        return jax.nn.log_softmax(out, axis=-1)  # [b, t, v]

    reference = jax.lax.stop_gradient(logits(None, WriteControl(WriteMode.READ_ONLY)))  # no memory: the frozen model
    ours = logits(MemoryState.zeros(model.cfg.num_layers, b, config), write_control(config, plain.valid))
    kl = jnp.sum(jnp.exp(reference) * (reference - ours), axis=-1)  # [b, t]
    return _mean(kl, plain.valid.astype(jnp.float32))


def episode_loss(params: nnx.State, frozen: nnx.State, graphdef, batch: Batch, remat: bool = True, value_weight: float = 1.0,
                 beta_weight: float = BETA_WEIGHT, plain_weight: float = 0.0, context_weight: float = 0.0):  # fmt: skip
    """Weighted mean answer cross-entropy per token + the β regularizer (both protocols)
    + `plain_weight` × the plain-text KL when the batch carries transcripts
    + `context_weight` × the same answer loss in context+memory mode when it carries contexts."""
    model = nnx.merge(graphdef, params, frozen)
    b = batch.read.tokens.shape[0]
    memory = MemoryState.zeros(model.cfg.num_layers, b, memory_of(model).config, gate_stats=True)
    memory = write_pass(model, batch, memory, remat)
    tokens = answer_ce(model, batch, memory, remat)
    ce = _mean(tokens, batch.target_mask.astype(jnp.float32))
    value_ce = _mean(tokens, (batch.target_mask & batch.value_mask).astype(jnp.float32))
    loss = _mean(tokens, target_weights(batch, value_weight)) if value_weight != 1.0 else ce
    penalty = beta_penalty(memory, beta_weight)
    aux = {"ce": ce, "value_ce": value_ce, "beta_penalty": penalty, "mean_beta": jnp.mean(mean_beta(memory)), "answer_tokens": jnp.sum(batch.target_mask)}
    if batch.plain is not None and plain_weight > 0:
        aux["plain_kl"] = plain_kl(model, batch.plain, remat)
        loss = loss + plain_weight * aux["plain_kl"]
    if batch.context is not None and context_weight > 0:
        tokens = context_ce(model, batch, remat)
        aux["context_ce"] = _mean(tokens, batch.target_mask.astype(jnp.float32))
        aux["context_value_ce"] = _mean(tokens, (batch.target_mask & batch.value_mask).astype(jnp.float32))
        loss = loss + context_weight * _mean(tokens, target_weights(batch, value_weight))
    return loss + penalty, aux


def make_train_step(graphdef, tx: optax.GradientTransformation, remat: bool = True, value_weight: float = 1.0, beta_weight: float = BETA_WEIGHT,
                    plain_weight: float = 0.0, context_weight: float = 0.0):  # fmt: skip
    """`step(params, opt_state, frozen, batch) -> (params, opt_state, metrics)`, jitted once.

    Gradients are taken with respect to `params` (the memory) only; `frozen` is an
    argument, never differentiated and never given optimizer state.
    """

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, frozen, batch):
        (loss, aux), grads = jax.value_and_grad(episode_loss, has_aux=True)(params, frozen, graphdef, batch, remat, value_weight, beta_weight,
                                                                            plain_weight, context_weight)  # fmt: skip
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}

    return step


def make_eval_loss(graphdef):
    """Jitted `(params, frozen, batch) -> metrics` with the same loss, no update."""

    @jax.jit
    def evaluate(params, frozen, batch):
        loss, aux = episode_loss(params, frozen, graphdef, batch, remat=False)
        return {"loss": loss, **aux}

    return evaluate


def make_recall_probe(graphdef):
    """Jitted held-out answer CE with three memories: the episode's own ("matched"),
    another episode's (the batch rolled by one: "other") and none ("empty", the frozen
    model); `value_<name>` is the same over the told value's tokens only. Only matched −
    other is recall; other − empty is format learned from any state. With contexts in the
    batch, "context" is the answer CE in context+memory mode."""

    @jax.jit
    def probe(params, frozen, batch):
        model = nnx.merge(graphdef, params, frozen)
        b = batch.read.tokens.shape[0]
        memory = write_pass(model, batch, MemoryState.zeros(model.cfg.num_layers, b, memory_of(model).config), False)
        other = MemoryState(S=jnp.roll(memory.S, 1, axis=1))
        answer, value = batch.target_mask.astype(jnp.float32), (batch.target_mask & batch.value_mask).astype(jnp.float32)
        out = {}
        for name, mem in (("matched", memory), ("other", other), ("empty", None)):
            tokens = answer_ce(model, batch, mem, False)
            out[name], out[f"value_{name}"] = _mean(tokens, answer), _mean(tokens, value)
        if batch.plain is not None:
            out["plain_kl"] = plain_kl(model, batch.plain, False)
        if batch.context is not None:
            tokens = context_ce(model, batch, False)
            out["context"], out["value_context"] = _mean(tokens, answer), _mean(tokens, value)
        return out

    return probe


__all__ = ["make_recall_probe", "OptimConfig", "answer_ce", "target_weights", "beta_penalty", "episode_loss", "make_eval_loss", "make_optimizer", "make_train_step", "mean_beta", "plain_kl", "split_model", "write_pass"]
