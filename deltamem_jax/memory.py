"""The δ-mem module of every layer (stacked): projections, gates, reads, writes, corrections."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from deltamem_jax import delta_rule
from deltamem_jax.array_typing import Array, Bool, Float
from deltamem_jax.config import DeltaMemConfig, OutputInit, UpdateMode
from deltamem_jax.state import MemoryState, WriteControl, WriteMode
from models.config import ModelConfig
from models.decoder import Attention, LayerFlag


class MemoryParam(nnx.Param):
    """A trainable δ-mem parameter; everything else in the model is frozen.

    `nnx.split(model, MemoryParam, ...)` separates them from the backbone.
    """


def _l2norm(x: Array, eps: float = 1e-6) -> Array:
    """x / max(‖x‖, eps), as torch's F.normalize."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class DeltaMem(nnx.Module):
    """All layers' memory parameters, stacked over layers; `__call__` runs one layer.

    `in_proj [l, d, 3R + G·sets]` fuses the memory query, key, value and gate
    projections (columns: q | k | v | β | λ, λ only when not coupled), so one matmul
    feeds the memory. `delta_{q,k,v,o}` map the read `[R]` to each corrected branch.
    """

    def __init__(self, config: DeltaMemConfig, model: ModelConfig, base: Attention, rngs: nnx.Rngs):
        self.config = config
        c, L, d = config, model.num_layers, model.hidden_size
        R, G = c.width, c.num_gates
        sets = 1 if self._coupled else 2
        keys = jax.random.split(rngs.params(), 4)
        bound = 1.0 / math.sqrt(d)  # kaiming-uniform(a=√5) on [R, d]
        qkv = jax.random.uniform(keys[0], (L, d, 3 * R), jnp.float32, -bound, bound)
        gates = jnp.zeros((L, d, G * sets), jnp.float32)  # β (and λ) projections start at zero
        self.in_proj = MemoryParam(jnp.concatenate([qkv, gates], -1), logical_axes=("layers", "embed", "memory"))
        bias = [jnp.full((L, G), c.beta_bias_init, jnp.float32)]
        if sets == 2:
            bias.append(jnp.full((L, G), -c.beta_bias_init, jnp.float32))
        self.gate_bias = MemoryParam(jnp.concatenate(bias, -1), logical_axes=("layers", "memory"))
        n, kv, h = model.num_heads, model.num_kv_heads, model.head_dim
        # torch-layout base weights [l, out, in] for base-slice init
        base_w = {
            "q": base.q_proj[...].reshape(L, d, n * h).transpose(0, 2, 1),
            "k": base.k_proj[...].reshape(L, d, kv * h).transpose(0, 2, 1),
            "v": base.v_proj[...].reshape(L, d, kv * h).transpose(0, 2, 1),
            "o": base.o_proj[...].reshape(L, n * h, d).transpose(0, 2, 1),
        }
        shapes = {"q": (n, h), "k": (kv, h), "v": (kv, h), "o": (d,)}
        axes = {"q": ("heads", "head_dim"), "k": ("kv_heads", "head_dim"), "v": ("kv_heads", "head_dim"), "o": ("embed",)}
        for i, branch in enumerate(c.branches):
            w = _init_delta(c, base_w[branch].astype(jnp.float32), jax.random.fold_in(keys[1], i))  # [l, R, out]
            w = w.reshape(L, R, *shapes[branch])
            setattr(self, f"delta_{branch}", MemoryParam(w, logical_axes=("layers", "memory", *axes[branch])))
        self.enabled = LayerFlag(jnp.asarray(c.layer_enabled(L), bool), logical_axes=("layers",))

    @property
    def _coupled(self) -> bool:
        return self.config.couple_lambda or self.config.update_mode == UpdateMode.NO_LAMBDA

    def features(self, x: Float[Array, "b t d"], z: Float[Array, "b t p"] | None = None) -> delta_rule.WriteInputs:
        """Memory query/key/value and gates of each token (float32, `[b, t, m, r]`), from
        `z = x @ in_proj` (given when decode computed it with the attention's q/k/v)."""
        c = self.config
        m, r, R, G = c.num_state_heads, c.rank, c.width, c.num_gates
        if z is None:
            z = jnp.einsum("btd,dp->btp", x.astype(jnp.float32), self.in_proj[...], precision=jax.lax.Precision.HIGHEST)
        z = z.astype(jnp.float32)
        b, t = z.shape[:2]
        qk = z[..., : 2 * R].reshape(b, t, 2 * m, r)  # q's sub-states, then k's
        if c.normalize_qk:
            qk = _l2norm(jnp.tanh(qk))
        q, k, v = qk[:, :, :m], qk[:, :, m:], z[..., 2 * R : 3 * R].reshape(b, t, m, r)
        gates = jax.nn.sigmoid(z[..., 3 * R :] + self.gate_bias[...])  # [b, t, G·sets]

        def per_row(g):  # [b, t, G] -> [b, t, m, r]
            return jnp.broadcast_to(g.reshape(b, t, m, -1), (b, t, m, r))

        beta = per_row(gates[..., :G])
        if c.update_mode == UpdateMode.NO_LAMBDA:
            lam = jnp.ones_like(beta)
        elif c.couple_lambda:
            lam = 1.0 - beta
        else:
            lam = per_row(gates[..., G:])
        mu = lam if c.update_mode == UpdateMode.LAMBDA_OUTSIDE else jnp.ones_like(beta)
        return delta_rule.WriteInputs(q=q, k=k, v=v, beta=beta, lam=lam, mu=mu)

    def __call__(
        self,
        x: Float[Array, "b t d"],
        state: MemoryState,  # one layer: S [b, m, r, r]
        valid: Bool[Array, "b t"],
        control: WriteControl,
        z: Float[Array, "b t p"] | None = None,  # x @ in_proj, when already computed
    ) -> tuple[Float[Array, "b t R"], MemoryState]:
        """Reads (concatenated sub-state-major) and the layer's new state."""
        c = self.config
        b, t, _ = x.shape
        valid = valid & self.enabled[...]
        f = self.features(x, z)
        s, stats = state.S, state.gate_stats
        if stats is not None and control.mode == WriteMode.TOKENS:
            stats = stats + _gate_sums(f.beta, valid)
        if control.mode == WriteMode.READ_ONLY:
            reads = jnp.where(valid[:, :, None, None], delta_rule.read(s, f.q), 0.0)
        elif control.mode == WriteMode.TOKENS:
            if t == 1:
                reads, s = delta_rule.write_step(s, f, valid)
            else:
                reads, s = self._write(s, f, valid)
        else:  # MESSAGES: every token reads S_0; each message writes its mean once, in id order
            slots = control.message_slots
            active = (slots >= 0) & valid
            seg = jnp.where(active, jnp.arange(b)[:, None] * t + slots, b * t).reshape(-1)
            xs = x.astype(jnp.float32).reshape(b * t, -1)
            sums = jax.ops.segment_sum(xs, seg, num_segments=b * t + 1)[:-1].reshape(b, t, -1)
            counts = jax.ops.segment_sum(jnp.ones_like(seg, jnp.float32), seg, num_segments=b * t + 1)
            counts = counts[:-1].reshape(b, t)
            means = sums / jnp.maximum(counts, 1.0)[..., None]  # [b, slots, d]
            msg_valid = (counts > 0) & self.enabled[...]
            fm = self.features(means)
            _, s = self._write(s, fm, msg_valid)
            if stats is not None:
                stats = stats + _gate_sums(fm.beta, msg_valid)
            reads = jnp.where(valid[:, :, None, None], delta_rule.read(state.S, f.q), 0.0)
        return reads.reshape(b, t, c.width), MemoryState(S=s, gate_stats=stats)

    def _write(self, state, f: delta_rule.WriteInputs, valid):
        """Many writes: the writer the config asks for (see `DeltaMemConfig.writer`)."""
        c = self.config
        chunked = c.writer == "chunked" or (c.writer == "auto" and jax.default_backend() != "cpu")
        if chunked:
            return delta_rule.write_chunked(state, f, valid, c.chunk_size)
        return delta_rule.write_scan(state, f, valid)

    def correction(self, branch: str, reads: Float[Array, "b t R"], dtype) -> Array:
        """scale · W_Δ r: added to the raw projection of `branch` (q/k/v per head, o flat)."""
        w = getattr(self, f"delta_{branch}")[...]  # [R, ...]
        out = jnp.tensordot(reads, w, axes=1, precision=jax.lax.Precision.HIGHEST)
        return (self.config.scale * out).astype(dtype)


def _gate_sums(beta: Float[Array, "b t m r"], valid: Bool[Array, "b t"]) -> Float[Array, "b 2"]:
    """Per row: the sum over written tokens of the mean gate, and the number of those tokens."""
    w = valid.astype(jnp.float32)
    return jnp.stack([jnp.sum(jnp.mean(beta, axis=(2, 3)) * w, axis=1), jnp.sum(w, axis=1)], axis=-1)


def _init_delta(c: DeltaMemConfig, base: Array, key) -> Array:
    """Initial W_Δ `[l, R, out]` from the official `output_init` rules (base: [l, out, in])."""
    L, out, fan_in = base.shape
    R = c.width
    if c.output_init == OutputInit.ZERO:
        return jnp.zeros((L, R, out), jnp.float32)
    if c.output_init == OutputInit.RANDOM:
        bound = 1.0 / math.sqrt(R)
        return c.online_gain * jax.random.uniform(key, (L, R, out), jnp.float32, -bound, bound)
    w = min(R, fan_in) if c.output_init == OutputInit.BASE_SLICE else min(c.base_slice_width, R, fan_in)
    cols = base[:, :, :w]  # [l, out, w]
    cols = cols / jnp.maximum(jnp.linalg.norm(cols, axis=1, keepdims=True), 1e-6)
    head = jnp.zeros((L, R, out), jnp.float32)
    return head.at[:, :w, :].set(c.online_gain * cols.transpose(0, 2, 1))


class DeltaMemAttention(nnx.Module):
    """A frozen attention with δ-mem: reads the memory, corrects q/k/v/o, writes the memory.

    Same protocol as `models.decoder.Attention`; with `memory=None` it is exactly the
    frozen attention.
    """

    def __init__(self, base: Attention, memory: DeltaMem):
        self.base = base
        self.memory = memory
        self.fused = False  # decode buffers: in_proj and W_Δo folded into the attention's matmuls

    def fuse_for_decode(self) -> None:
        """`Attention.fuse_for_decode` with the memory's `in_proj` beside q/k/v and
        `scale · W_Δo` under `o_proj`: per layer and token, two small matmuls fewer (at
        ~10–30 µs each on CPU, most of δ-mem's decode cost; `scripts/profile_decode.py
        --memory msw`). Only for float32 weights, so the memory's float32 projections keep
        their precision."""
        if self.base.q_proj.dtype != jnp.float32:
            return self.base.fuse_for_decode()
        c = self.memory.config
        side_out = None
        if "o" in c.branches:
            side_out = c.scale * self.memory.delta_o[...]  # [R, d]
        self.base.fuse_for_decode(side_in=self.memory.in_proj[...], side_out=side_out)
        self.fused = True

    def __call__(self, x, positions, valid, cache, memory: MemoryState | None, control: WriteControl | None, use_rope):
        if memory is None and not self.fused:
            return self.base(x, positions, valid, cache, None, control, use_rope)
        q, k, v, side = self.base.project(x)
        if memory is None:  # fused decode buffers without a memory: zero reads, the frozen attention
            reads = jnp.zeros((*x.shape[:2], self.memory.config.width), jnp.float32)
        else:
            reads, memory = self.memory(x, memory, valid, control or WriteControl(), side if self.fused else None)
        branches = self.memory.config.branches
        if "q" in branches:
            q = q + self.memory.correction("q", reads, q.dtype)
        if "k" in branches:
            k = k + self.memory.correction("k", reads, k.dtype)
        if "v" in branches:
            v = v + self.memory.correction("v", reads, v.dtype)
        a, kv = self.base.attend(q, k, v, positions, valid, cache, use_rope)
        if self.fused and "o" in branches:
            return self.base.output(a, reads), kv, memory
        y = self.base.output(a)
        if "o" in branches:
            y = y + self.memory.correction("o", reads, y.dtype)
        return y, kv, memory
