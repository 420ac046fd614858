"""A Flax NNX decoder for the Llama family: Llama/SmolLM2, Qwen2, Qwen3, SmolLM3.

Layers are stacked (every parameter has a leading `layers` axis) and run with one
`jax.lax.scan`, which compiles once per layer body instead of once per layer. The KV
cache and an optional memory state are explicit inputs and outputs; the model holds no
mutable state besides its parameters.

Attention modules share one protocol so that δ-mem can wrap the frozen attention:
`attn(x, positions, valid, cache, memory, control, use_rope) -> (y, (k, v), memory)`,
where `memory`/`control` are opaque here (None for the plain backbone).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from models.config import ModelConfig

Array = jax.Array
_MASKED = -1e30  # finite, so a fully masked row cannot produce NaN


class LayerFlag(nnx.Variable):
    """A per-layer constant (not trained), stacked over layers like the parameters."""


def _param(rngs: nnx.Rngs, shape, axes, dtype, std: float | None = 0.02, fill: float | None = None):
    if fill is not None:
        value = jnp.full(shape, fill, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


# ---------------------------------------------------------------------------- cache


@struct.dataclass
class SharedPrefix:
    """Keys and values of a prefix that every row of a batch continues (one copy, no batch
    axis): many questions about one long document attend to it without tiling it per row."""

    k: Array  # [l, k, h, p], or per layer (`unstack`) a tuple of [k, h, p]
    v: Array  # [l, k, p, h], or per layer a tuple of [k, p, h]
    valid: Array  # [p] bool

    @classmethod
    def of(cls, cache: KVCache) -> SharedPrefix:
        """The filled slots of a one-row cache (e.g. a prefilled document) as a shared prefix."""
        if cache.valid.shape[0] != 1 or cache.per_layer or cache.prefix is not None:
            raise ValueError("a shared prefix is made from a stacked one-row cache without a prefix of its own")
        n = int(cache.end)
        return cls(k=cache.k[:, 0, :, :, :n], v=cache.v[:, 0, :, :n], valid=cache.valid[0, :n])

    @property
    def length(self) -> int:
        return self.valid.shape[0]

    def unstack(self) -> SharedPrefix:
        """Each layer's keys and values as separate arrays (as `KVCache.unstack`)."""
        return self.replace(k=tuple(self.k), v=tuple(self.v))


@struct.dataclass
class KVCache:
    """Keys and values of every layer. New tokens go to slots [end, end+t).

    Prompts of a batch are left-padded to a common length, so all rows share `end`;
    `valid` marks which slots hold real tokens. With a `prefix`, every row attends to
    the prefix's slots first, then to its own: the slots here continue the prefix
    (the caller gives positions after it).
    """

    # Layouts chosen so a decode step's two attention products are plain (NN) matmuls,
    # q [g, h] @ k [h, s] and p [g, s] @ v [s, h]: XLA CPU ran them 2× faster than with
    # k [s, h] and v [h, s] (`scripts/ab_cache_layout.py`). Prompts (many queries) read
    # the cache transposed (`dense_attention`, `blockwise_attention`): one copy per call.
    k: Array  # [l, b, k, h, s], or per layer (`unstack`) a tuple of [b, k, h, s]
    v: Array  # [l, b, k, s, h], or per layer a tuple of [b, k, s, h]
    valid: Array  # [b, s] bool
    end: Array  # [] int32: slots in use
    prefix: SharedPrefix | None = None

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, max_len: int, prefix: SharedPrefix | None = None) -> KVCache:
        lead = (cfg.num_layers, batch, cfg.num_kv_heads)
        return cls(
            k=jnp.zeros(lead + (cfg.head_dim, max_len), cfg.jnp_dtype),
            v=jnp.zeros(lead + (max_len, cfg.head_dim), cfg.jnp_dtype),
            valid=jnp.zeros((batch, max_len), bool),
            end=jnp.zeros((), jnp.int32),
            prefix=prefix,
        )

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, tuple)

    def unstack(self) -> KVCache:
        """The same cache with each layer's keys and values as separate arrays, for a decode
        loop over `layer_buffers`: each layer then updates its own arrays in place
        (`CacheSlots`). Measured on CPU with SmolLM2, batch 1: 26 → 31 tok/s at 512 slots,
        16 → 23 at 2k (with the ordered write in `Attention.attend`). A no-op when it is
        already per layer."""
        return self if self.per_layer else self.replace(k=tuple(self.k), v=tuple(self.v))

    def stack(self) -> KVCache:
        """The inverse of `unstack` (a no-op on a stacked cache)."""
        return self.replace(k=jnp.stack(self.k), v=jnp.stack(self.v)) if self.per_layer else self

    def resized(self, max_len: int) -> KVCache:
        """The same cache with `max_len` slots: empty slots added, or unused ones dropped.
        Attention reads every slot of the cache, used or not, so a cache sized to what a
        conversation needs decodes faster than one sized to its limit (`Session`)."""
        end = int(self.end)
        if max_len < end:
            raise ValueError(f"a cache of {max_len} slots cannot hold the {end} in use")
        n = max_len - self.max_len

        def fit(x, axis):  # pad with zeros, or keep the first max_len slots, along `axis`
            if n >= 0:
                return jnp.pad(x, [(0, n if a == axis % x.ndim else 0) for a in range(x.ndim)])
            return jax.lax.slice_in_dim(x, 0, max_len, axis=axis)

        k = tuple(fit(x, -1) for x in self.k) if self.per_layer else fit(self.k, -1)
        v = tuple(fit(x, -2) for x in self.v) if self.per_layer else fit(self.v, -2)
        return self.replace(k=k, v=v, valid=fit(self.valid, 1))

    def append(self, k: Array, v: Array, valid: Array) -> KVCache:
        """Writes new keys/values `[l, b, t, k, h]` at slot `end` (in place under donation)."""
        k = k.transpose(0, 1, 3, 4, 2).astype(self.k.dtype)  # [l, b, k, h, t]
        v = v.transpose(0, 1, 3, 2, 4).astype(self.v.dtype)  # [l, b, k, t, h]
        return self.written(
            jax.lax.dynamic_update_slice(self.k, k, (0, 0, 0, 0, self.end)),
            jax.lax.dynamic_update_slice(self.v, v, (0, 0, 0, self.end, 0)),
            valid,
        )

    def written(self, k, v, valid: Array) -> KVCache:
        """The cache with keys/values `k`, `v` that already hold the new tokens `valid`
        `[b, t]` at slot `end`: marks those slots and moves `end` past them."""
        return self.replace(k=k, v=v, valid=jax.lax.dynamic_update_slice(self.valid, valid, (0, self.end)), end=self.end + valid.shape[1])


class CacheSlots(NamedTuple):
    """One layer's own cache arrays, given to its attention to update in place: it attends
    over them and the new tokens, then writes the new tokens at slots [end, end+t) and
    returns the arrays. A decode loop over a per-layer cache (`KVCache.unstack`) passes
    this; a stacked cache would have XLA CPU copy each layer's slice every step."""

    k: Array  # [b, k, h, s]
    v: Array  # [b, k, s, h]
    valid: Array  # [b, s] bool, before the new tokens
    end: Array  # [] int32
    prefix: tuple[Array, Array, Array] | None = None  # this layer's shared prefix: k [k,h,p], v [k,p,h], valid [p]


# ---------------------------------------------------------------------------- layers


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """RMSNorm computed in float32, as Hugging Face does, then cast back."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> Array:
    """Inverse frequencies `[h/2]`, with linear or llama3 scaling when configured."""
    h = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    scaling = dict(cfg.rope_scaling or ())
    kind = scaling.get("rope_type")
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * inv / factor + smooth * inv
        inv = jnp.where(wavelen > old / lo, inv / factor, jnp.where(wavelen < old / hi, inv, mid))
    return inv


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
    """Hugging Face 'rotate_half' RoPE. x: [b, t, n, h], positions: [b, t]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, h/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


ATTENTION_BLOCK = 512  # prompts longer than this attend blockwise, in key blocks of this size
QUERY_BLOCK = 128  # and query blocks of this size (`scripts/ab_prompt_attention.py`)


def _part(scores: Array, values) -> tuple[Array, Array, Array]:
    """One part of a softmax computed in parts (a shared prefix's): (max, sum of exp,
    exp-weighted values) over the key axis of scores [..., s] float32, where values(e)
    gives the weighted values of the weights e."""
    m = jnp.max(scores, axis=-1)
    e = jnp.exp(scores - m[..., None])
    return m, jnp.sum(e, axis=-1), values(e)


def _keys_major_part(blocks) -> tuple[Array, Array, Array]:
    """`_part` over score blocks laid out keys-major (a row's cache and new tokens), each
    (scores [..., s_i, q] float32, values [..., h+1, s_i] with a last row of ones): the max
    reduces over a major axis and the value product `values @ exp` also sums the weights
    (its last row), the two passes XLA CPU is slowest at over a minor axis (see
    `blockwise_attention`). → m, l [..., q], o [..., q, h]."""
    m = functools.reduce(jnp.maximum, [jnp.max(sc, axis=-2) for sc, _ in blocks])
    out = sum(
        jnp.einsum("...hs,...sq->...hq", v1, jnp.exp(sc - m[..., None, :]).astype(v1.dtype), preferred_element_type=jnp.float32)
        for sc, v1 in blocks
    )
    return m, out[..., -1, :], jnp.swapaxes(out[..., :-1, :], -1, -2)


def _with_ones_row(values: Array) -> Array:
    """values [..., h, s] → [..., h+1, s]: the row that makes a value product sum its weights."""
    return jnp.concatenate([values, jnp.ones_like(values[..., :1, :])], axis=-2)


def _merge(parts) -> Array:
    """The softmax-weighted values over all parts (`_part`s, in one layout): each part is
    rescaled to the common max, so a large part (a shared prefix) is never concatenated
    with the others or copied."""
    if len(parts) == 1:
        _, total, out = parts[0]
        return out / total[..., None]
    m = functools.reduce(jnp.maximum, [pm for pm, _, _ in parts])
    out = total = 0.0
    for pm, pl, po in parts:
        w = jnp.exp(pm - m)
        total, out = total + w * pl, out + w[..., None] * po
    return out / total[..., None]


def _prefix_part(q: Array, prefix) -> tuple[Array, Array, Array]:
    """The shared prefix's part for queries q [k, n, h] (every row's queries of a KV head
    as one matrix, so each product is one matmul per KV head): m, l [k, n], o [k, n, h]."""
    pk, pv, pvalid = prefix  # [k,h,p], [k,p,h], [p]
    scores = jnp.einsum("knh,khs->kns", q, pk, preferred_element_type=jnp.float32)
    return _part(jnp.where(pvalid, scores, _MASKED), lambda e: jnp.einsum("kns,ksh->knh", e.astype(pv.dtype), pv, preferred_element_type=jnp.float32))


def _step_attention(qg: Array, k: Array, v: Array, valid: Array, cache) -> Array:
    """`dense_attention` for one new token (a decode step, t = 1), one query head of each
    group at a time: per KV head, `q [h] @ k [h, s]` and `p [s] @ v [s, h]` over the
    cache (vector-matrix products, batched over rows and KV heads), the token's own key and
    value as element-wise products. Written so, XLA CPU keeps the cache in its layout (with
    a `t` axis in the products, or the token's own score concatenated to the cache's, it
    transposed each layer's keys every step), and the vector-matrix products ran faster
    than the group's `[g, h] @ [h, s]` matmuls although each reads the cache once per query
    head (30 layers on the AMD EPYC: 17.30 against 15.18 ms at b=8 over 528 slots, 11.25
    against 8.69 at b=1 over 2,064, `scripts/ab_cache_layout.py`)."""
    b, _, kvh, g, h = qg.shape
    if cache is None:  # the token attends to itself alone
        return jnp.broadcast_to(v[:, :, :, None, :], qg.shape).astype(qg.dtype)
    q = qg[:, 0]  # [b,k,g,h]
    ck, cv, cvalid, prefix = cache
    own_k, own_v = k[:, 0].astype(jnp.float32), v[:, 0].astype(jnp.float32)  # [b,k,h]
    heads = []  # per query head of a group: m, l [b,k], o [b,k,h]
    for i in range(g):
        qi = q[:, :, i]  # [b,k,h]
        own = jnp.where(valid, jnp.sum(qi.astype(jnp.float32) * own_k, axis=-1), _MASKED)  # [b,k]
        cs = jnp.einsum("bkh,bkhs->bks", qi, ck, preferred_element_type=jnp.float32)
        cs = jnp.where(cvalid[:, None, :], cs, _MASKED)
        m = jnp.maximum(jnp.max(cs, axis=-1), own)
        e, e_own = jnp.exp(cs - m[..., None]), jnp.exp(own - m)
        o = jnp.einsum("bks,bksh->bkh", e.astype(cv.dtype), cv, preferred_element_type=jnp.float32) + e_own[..., None] * own_v
        heads.append((m, jnp.sum(e, axis=-1) + e_own, o))
    parts = [tuple(jnp.stack(x, axis=2) for x in zip(*heads))]  # m, l [b,k,g], o [b,k,g,h]
    if prefix is not None:  # one copy for every row: no batch axis on its keys
        m, l, o = _prefix_part(q.transpose(1, 0, 2, 3).reshape(kvh, b * g, h), prefix)
        parts.append((m.reshape(kvh, b, g).transpose(1, 0, 2), l.reshape(kvh, b, g).transpose(1, 0, 2),
                      o.reshape(kvh, b, g, h).transpose(1, 0, 2, 3)))  # fmt: skip
    return _merge(parts)[:, None].astype(qg.dtype)


def dense_attention(qg: Array, k: Array, v: Array, valid: Array, cache) -> Array:
    """Causal GQA attention with the full score matrix (decode steps and short prompts).

    qg [b,t,k,g,h] (scaled), k, v [b,t,k,h], valid [b,t]; cache None or
    (ck [b,k,h,s], cv [b,k,s,h], cvalid [b,s], prefix), all before the new tokens (the
    `KVCache` layouts), where prefix is None or a shared prefix every row attends to first
    (pk [k,h,p], pv [k,p,h], pvalid [p]). → [b,t,k,g,h]
    The `g` query heads of a KV head are stacked into one `[g·t, h]` matrix, so both
    products are plain batched matmuls (2.5× faster for a 512-token prompt on CPU than a
    separate `g` axis, which stays faster for a single decode token). The softmax is
    computed per part (prefix; cache and new tokens keys-major, `_keys_major_part`) and
    merged (`_merge`).
    """
    b, t, kvh, g, h = qg.shape
    if t == 1:
        return _step_attention(qg, k, v, valid, cache)
    q = qg.transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, h)
    causal = jnp.tile(jnp.triu(jnp.ones((t, t), bool)), (1, g))  # [t keys, gt queries]
    parts, own = [], []  # parts: m, l [b,k,gt], o [b,k,gt,h]; own: this batch's own key blocks, keys-major
    if cache is not None:
        ck, cv, cvalid, prefix = cache
        if prefix is not None:
            m, l, o = _prefix_part(q.transpose(1, 0, 2, 3).reshape(kvh, b * g * t, h), prefix)
            parts.append((m.reshape(kvh, b, g * t).transpose(1, 0, 2), l.reshape(kvh, b, g * t).transpose(1, 0, 2),
                          o.reshape(kvh, b, g * t, h).transpose(1, 0, 2, 3)))  # fmt: skip
        cs = jnp.einsum("bkhs,bkqh->bksq", ck, q, preferred_element_type=jnp.float32)
        own.append((jnp.where(cvalid[:, None, :, None], cs, _MASKED), _with_ones_row(jnp.swapaxes(cv, -1, -2))))
    scores = jnp.einsum("bskh,bkqh->bksq", k, q, preferred_element_type=jnp.float32)
    scores = jnp.where(causal & valid[:, None, :, None], scores, _MASKED)
    own.append((scores, _with_ones_row(v.transpose(0, 2, 3, 1))))
    out = _merge([*parts, _keys_major_part(own)]).astype(qg.dtype)
    return out.reshape(b, kvh, g, t, h).transpose(0, 3, 1, 2, 4)


def blockwise_attention(
    qg: Array, k: Array, v: Array, valid: Array, cache, block: int = ATTENTION_BLOCK, query_block: int = QUERY_BLOCK
) -> Array:
    """`dense_attention` computed block by block with an online softmax (flash-attention
    style): peak memory is linear in the prompt length, and key blocks wholly in a query
    block's future, or with no valid key, are skipped. Same arguments and result as
    `dense_attention`; `block` keys against `query_block` query tokens at a time.

    Layout, for speed on XLA CPU (`scripts/profile_decode.py --prefill` shows the ops):
    - each query block is one `[g·B_q, h]` matrix per KV head (the `g` query heads sharing
      a KV head stacked), so both products are plain batched matmuls;
    - a score block is `[keys, queries]`: the softmax's max reduces over a major axis,
      ~3× faster than over the minor one, which XLA CPU runs at ~1.5 G elements/s;
    - the value product is `[h+1, keys] @ p [keys, queries]` with a row of ones under the
      values, so it also sums the weights (no reduction pass of its own);
    - the new keys start on a key-block boundary (the cache part is padded to whole
      blocks), so a segment's causal skipping is exact.
    """
    b, t, kvh, g, h = qg.shape
    keys, values, kvalid = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 3, 1), valid  # [b,k,t,h], [b,k,h,t], [b,t]
    s = 0
    if cache is not None:
        ck, cv, cvalid, prefix = cache  # [b,k,h,S], [b,k,S,h], [b,S]
        ck, cv = jnp.swapaxes(ck, -1, -2), jnp.swapaxes(cv, -1, -2)  # [b,k,S,h], [b,k,h,S], copied below anyway
        if prefix is not None:  # a long prompt after a shared prefix: the prefix copied per row here
            pk, pv, pvalid = prefix
            pk, pv = jnp.swapaxes(pk, -1, -2), jnp.swapaxes(pv, -1, -2)
            ck = jnp.concatenate([jnp.broadcast_to(pk, (b, *pk.shape)).astype(ck.dtype), ck], axis=2)
            cv = jnp.concatenate([jnp.broadcast_to(pv, (b, *pv.shape)).astype(cv.dtype), cv], axis=3)
            cvalid = jnp.concatenate([jnp.broadcast_to(pvalid, (b, pvalid.shape[0])), cvalid], axis=1)
        s = -(-ck.shape[2] // block) * block
        pad_c = s - ck.shape[2]
        keys = jnp.concatenate([jnp.pad(ck, ((0, 0), (0, 0), (0, pad_c), (0, 0))), keys.astype(ck.dtype)], axis=2)
        values = jnp.concatenate([jnp.pad(cv, ((0, 0), (0, 0), (0, 0), (0, pad_c))), values.astype(cv.dtype)], axis=3)
        kvalid = jnp.concatenate([jnp.pad(cvalid, ((0, 0), (0, pad_c))), valid], axis=1)
    qb = query_block
    nq = -(-t // qb)
    nk = -(-(s + t) // block)
    pad_k = nk * block - (s + t)
    keys = jnp.pad(keys, ((0, 0), (0, 0), (0, pad_k), (0, 0))).reshape(b, kvh, nk, block, h).transpose(2, 0, 1, 3, 4)
    values = _with_ones_row(jnp.pad(values, ((0, 0), (0, 0), (0, 0), (0, pad_k))))  # [b,k,h+1,s]
    values = values.reshape(b, kvh, h + 1, nk, block).transpose(3, 0, 1, 2, 4)
    kvalid = jnp.pad(kvalid, ((0, 0), (0, pad_k))).reshape(b, nk, block).transpose(1, 0, 2)  # [nk, b, B]
    qblocks = jnp.pad(qg, ((0, 0), (0, nq * qb - t), (0, 0), (0, 0), (0, 0)))
    qblocks = qblocks.reshape(b, nq, qb, kvh, g, h).transpose(1, 0, 3, 4, 2, 5).reshape(nq, b, kvh, g * qb, h)
    offsets = jnp.arange(block)
    row_offsets = jnp.tile(jnp.arange(qb), g)  # each row of a [g·B_q] query block: its token's place in the block

    def one_query_block(args):
        qblk, qi = args  # [b,k,gQ,h], []
        q_index = s + qi * qb + row_offsets  # key-space index of each query row

        def one_key_block(carry, xs):
            kblk, vblk, kv_ok, ki = xs  # [b,k,B,h], [b,k,h+1,B], [b,B], []
            k_index = ki * block + offsets

            def update(carry):
                m, acc = carry  # [b,k,gQ], [b,k,h+1,gQ] (float32; the last row: the weights' sum)
                allowed = kv_ok[:, None, :, None] & (k_index[:, None] <= q_index[None, :])
                sc = jnp.einsum("bksh,bkqh->bksq", kblk, qblk, preferred_element_type=jnp.float32)
                sc = jnp.where(allowed, sc, _MASKED)
                m_new = jnp.maximum(m, jnp.max(sc, axis=-2))
                p = jnp.exp(sc - m_new[..., None, :])
                pv = jnp.einsum("bkhs,bksq->bkhq", vblk, p.astype(vblk.dtype), preferred_element_type=jnp.float32)
                return m_new, acc * jnp.exp(m - m_new)[..., None, :] + pv

            # skip blocks wholly in the future, and blocks with no valid key (the unused
            # tail of a preallocated cache): they would add exactly zero
            needed = (ki * block <= s + qi * qb + qb - 1) & jnp.any(kv_ok)
            return jax.lax.cond(needed, update, lambda c: c, carry), None

        init = (jnp.full((b, kvh, g * qb), _MASKED, jnp.float32), jnp.zeros((b, kvh, h + 1, g * qb), jnp.float32))
        (_, acc), _ = jax.lax.scan(one_key_block, init, (keys, values, kvalid, jnp.arange(nk)))
        return (acc[:, :, :h] / acc[:, :, h:]).transpose(0, 1, 3, 2).astype(qg.dtype)  # [b,k,gQ,h]

    out = jax.lax.map(one_query_block, (qblocks, jnp.arange(nq)))  # [nq, b, k, gQ, h]
    out = out.reshape(nq, b, kvh, g, qb, h).transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * qb, kvh, g, h)
    return out[:, :t]


def fused_attention(qg: Array, k: Array, v: Array, valid: Array, cache, implementation: str = "cudnn") -> Array:
    """`dense_attention` through `jax.nn.dot_product_attention`, the platform's fused kernel
    (`implementation="cudnn"`: cuDNN's flash attention on a CUDA GPU, bfloat16). Same
    arguments and result. The prefix, the cache's slots and the new tokens become one key
    sequence `[b, s, k, h]` with a boolean mask of what each query may see (cuDNN turns it
    into a bias). Queries and keys are padded to even counts with masked entries: cuDNN's
    backward with a bias refuses odd lengths, and training differentiates through prompts.
    With `implementation="xla"` it runs on any backend: the tests check this layout and
    mask against `dense_attention` on the CPU."""
    b, t, kvh, g, h = qg.shape
    dt = qg.dtype
    keys, values, masks = [], [], []  # [b,s_i,k,h] each; masks [b,t,s_i]
    if cache is not None:
        ck, cv, cvalid, prefix = cache
        if prefix is not None:
            pk, pv, pvalid = prefix  # [k,h,p], [k,p,h], [p]
            p = pvalid.shape[0]
            keys.append(jnp.broadcast_to(pk.transpose(2, 0, 1), (b, p, kvh, h)))
            values.append(jnp.broadcast_to(pv.transpose(1, 0, 2), (b, p, kvh, h)))
            masks.append(jnp.broadcast_to(pvalid, (b, t, p)))
        keys.append(ck.transpose(0, 3, 1, 2))  # [b,k,h,s] → [b,s,k,h]
        values.append(cv.transpose(0, 2, 1, 3))  # [b,k,s,h] → [b,s,k,h]
        masks.append(jnp.broadcast_to(cvalid[:, None, :], (b, t, cvalid.shape[1])))
    keys.append(k)
    values.append(v)
    masks.append(jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :])
    s = sum(x.shape[1] for x in keys)
    if s % 2:  # one more key slot, masked
        keys.append(jnp.zeros((b, 1, kvh, h), k.dtype))
        values.append(jnp.zeros((b, 1, kvh, h), v.dtype))
        masks.append(jnp.zeros((b, t, 1), bool))
    mask = jnp.concatenate(masks, axis=-1)
    q = qg.reshape(b, t, kvh * g, h)  # query head i·g + j uses KV head i, as jax's GQA does
    if t % 2:  # one more query row, masked out and dropped
        q = jnp.concatenate([q, jnp.zeros((b, 1, kvh * g, h), dt)], axis=1)
        mask = jnp.concatenate([mask, jnp.zeros((b, 1, mask.shape[-1]), bool)], axis=1)
    out = jax.nn.dot_product_attention(
        q, jnp.concatenate(keys, axis=1).astype(dt), jnp.concatenate(values, axis=1).astype(dt),
        mask=mask[:, None], scale=1.0, implementation=implementation,  # qg comes scaled
    )  # fmt: skip
    return out[:, :t].reshape(b, t, kvh, g, h)


def prompt_attention_kind(cfg: ModelConfig) -> str:
    """`cfg.attention` resolved for the default backend: "cudnn" on a GPU when the dtype
    and head size allow it ("auto"), else "blockwise". TPUs keep the blockwise XLA path:
    `jax.nn.dot_product_attention` has no TPU kernel, and Pallas' TPU flash attention
    neither shares KV heads nor offsets its causal mask by a cache."""
    client = jax.devices()[0].client
    on_cuda = jax.default_backend() == "gpu" and "rocm" not in f"{client.platform} {client.platform_version}".lower()
    if cfg.attention == "cudnn" and not on_cuda:
        raise ValueError(f"attention='cudnn' needs a CUDA GPU; the default JAX backend is {client.platform!r}")
    if cfg.attention == "auto":
        return "cudnn" if on_cuda and cfg.dtype == "bfloat16" and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128 else "blockwise"
    return cfg.attention


class Attention(nnx.Module):
    """Frozen grouped-query attention, split in steps so δ-mem can correct q/k/v/o."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, d, n, kv, h, dt = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.jnp_dtype
        self.cfg = cfg
        self.q_proj = _param(rngs, (L, d, n, h), ("layers", "embed", "heads", "head_dim"), dt)
        self.k_proj = _param(rngs, (L, d, kv, h), ("layers", "embed", "kv_heads", "head_dim"), dt)
        self.v_proj = _param(rngs, (L, d, kv, h), ("layers", "embed", "kv_heads", "head_dim"), dt)
        self.o_proj = _param(rngs, (L, n, h, d), ("layers", "heads", "head_dim", "embed"), dt)
        if cfg.qkv_bias:
            self.q_bias = _param(rngs, (L, n, h), ("layers", "heads", "head_dim"), dt, fill=0.0)
            self.k_bias = _param(rngs, (L, kv, h), ("layers", "kv_heads", "head_dim"), dt, fill=0.0)
            self.v_bias = _param(rngs, (L, kv, h), ("layers", "kv_heads", "head_dim"), dt, fill=0.0)
        if cfg.o_bias:
            self.o_bias = _param(rngs, (L, d), ("layers", "embed"), dt, fill=0.0)
        if cfg.qk_norm:
            self.q_norm = _param(rngs, (L, h), ("layers", "head_dim"), dt, fill=1.0)
            self.k_norm = _param(rngs, (L, h), ("layers", "head_dim"), dt, fill=1.0)
        self.qkv_proj = nnx.data(None)  # set only in decode's per-layer buffers (`fuse_for_decode`)

    def fuse_for_decode(self, side_in: Array | None = None, side_out: Array | None = None) -> None:
        """For decode's per-layer buffers (`split_layers`), on one layer's slice: the q/k/v
        weights become one `qkv_proj [d, (n+2k)·h + p]`, one matmul instead of three (XLA
        CPU runs a 576-wide matvec on one thread and a 960-wide one on all of them,
        `scripts/profile_decode.py`).

        A wrapper may append its own small projections of the same input (`side_in [d, p]`,
        returned by `project` as `side`) and of extra output inputs (`side_out [p', d]`,
        rows under `o_proj`, fed by `output(a, side)`): each then costs no matmul of its own.
        """
        d = self.q_proj.shape[0]  # one layer's slice: [d, n, h]
        cols = [self.q_proj[...].reshape(d, -1), self.k_proj[...].reshape(d, -1), self.v_proj[...].reshape(d, -1)]
        self.qkv_proj = nnx.Param(jnp.concatenate(cols + ([] if side_in is None else [side_in.astype(cols[0].dtype)]), axis=1))
        del self.q_proj, self.k_proj, self.v_proj
        if side_out is not None:
            w = self.o_proj[...]
            w = w.reshape(-1, w.shape[-1])  # [n·h, d]
            self.o_proj = nnx.Param(jnp.concatenate([w, side_out.astype(w.dtype)], axis=0))

    def project(self, x: Array) -> tuple[Array, Array, Array, Array]:
        """Raw projections: q [b,t,n,h], k, v [b,t,k,h] (before norms and RoPE), and the
        `side` columns a wrapper appended in decode's buffers ([b,t,p], p = 0 otherwise)."""
        n, kv, h = self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim
        if self.qkv_proj is not None:
            w = self.qkv_proj[...]
            side_cols = w.shape[1] > (n + 2 * kv) * h  # δ-mem's float32 projections: full precision
            z = jnp.einsum("btd,dp->btp", x, w, precision=jax.lax.Precision.HIGHEST if side_cols else None)
            b, t, _ = z.shape
            q = z[..., : n * h].reshape(b, t, n, h)
            k = z[..., n * h : (n + kv) * h].reshape(b, t, kv, h)
            v = z[..., (n + kv) * h : (n + 2 * kv) * h].reshape(b, t, kv, h)
            side = z[..., (n + 2 * kv) * h :]
        else:
            q = jnp.einsum("btd,dnh->btnh", x, self.q_proj[...])
            k = jnp.einsum("btd,dkh->btkh", x, self.k_proj[...])
            v = jnp.einsum("btd,dkh->btkh", x, self.v_proj[...])
            side = jnp.zeros((*x.shape[:2], 0), x.dtype)
        if self.cfg.qkv_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        return q, k, v, side

    def attend(self, q, k, v, positions, valid, cache, use_rope) -> tuple[Array, tuple[Array, Array]]:
        """Norms, RoPE and causal GQA attention over (cache slots, then the new tokens).

        Returns the attention output [b,t,n,h] and what the cache needs: the new tokens'
        roped keys and values (k, v) [b,t,k,h], or, when `cache` is `CacheSlots`, that
        layer's cache arrays with them written in.
        """
        eps = self.cfg.rms_norm_eps
        inv_freq = rope_frequencies(self.cfg)  # a compile-time constant
        if self.cfg.qk_norm:
            q, k = rms_norm(q, self.q_norm[...], eps), rms_norm(k, self.k_norm[...], eps)
        q = jnp.where(use_rope, apply_rope(q, positions, inv_freq), q)
        k = jnp.where(use_rope, apply_rope(k, positions, inv_freq), k)
        b, t, n, h = q.shape
        kvh = k.shape[2]
        qg = q.reshape(b, t, kvh, n // kvh, h) * jnp.asarray(h**-0.5, q.dtype)  # [b,t,k,g,h]
        if isinstance(cache, CacheSlots):
            out = dense_attention(qg, k, v, valid, (cache.k, cache.v, cache.valid, cache.prefix))
            # The write must follow the read of the old cache in the dataflow, or XLA's copy
            # insertion, unable to order the two, copies the whole cache every step (twice per
            # layer; measured 2.5× the time of a 30-layer decode's attention). Adding 0·out
            # orders them; XLA keeps the float multiply (0·NaN is NaN), so it is not folded away.
            zero = jnp.zeros((), out.dtype) * out[0, 0, 0, 0, 0]
            ck = jax.lax.dynamic_update_slice(cache.k, (k.transpose(0, 2, 3, 1) + zero).astype(cache.k.dtype), (0, 0, 0, cache.end))
            cv = jax.lax.dynamic_update_slice(cache.v, (v.transpose(0, 2, 1, 3) + zero).astype(cache.v.dtype), (0, 0, cache.end, 0))
            return out.reshape(b, t, n, h), (ck, cv)
        if t > 1 and prompt_attention_kind(self.cfg) == "cudnn":
            out = fused_attention(qg, k, v, valid, cache, "cudnn")
        elif t > ATTENTION_BLOCK:  # long prompts: never a [t, t] score matrix
            out = blockwise_attention(qg, k, v, valid, cache, ATTENTION_BLOCK, QUERY_BLOCK)
        else:
            out = dense_attention(qg, k, v, valid, cache)
        return out.reshape(b, t, n, h), (k, v)

    def output(self, a: Array, side: Array | None = None) -> Array:
        """The output projection of a [b,t,n,h]; with `side` [b,t,p'] (decode buffers, see
        `fuse_for_decode`) also the rows appended under `o_proj`, in the same matmul."""
        # as one [n·h, d] matrix (a free reshape): with separate n, h axes XLA CPU transposed
        # the weight inside the decode loop, a copy of it every step
        b, t, n, h = a.shape
        w = self.o_proj[...]
        w = w.reshape(-1, w.shape[-1])
        a = a.reshape(b, t, n * h)
        if side is not None:
            a = jnp.concatenate([a, side.astype(a.dtype)], axis=-1)
        if a.shape[-1] != w.shape[0]:
            raise ValueError(f"o_proj has {w.shape[0]} input rows, the attention output (and side) {a.shape[-1]}")
        y = jnp.einsum("btm,md->btd", a, w, precision=jax.lax.Precision.HIGHEST if side is not None else None)
        return y + self.o_bias[...] if self.cfg.o_bias else y

    def __call__(self, x, positions, valid, cache, memory, control, use_rope):
        q, k, v, _ = self.project(x)
        a, kv = self.attend(q, k, v, positions, valid, cache, use_rope)
        return self.output(a), kv, memory


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, d, f, dt = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.jnp_dtype
        self.gate_proj = _param(rngs, (L, d, f), ("layers", "embed", "mlp"), dt)
        self.up_proj = _param(rngs, (L, d, f), ("layers", "embed", "mlp"), dt)
        self.down_proj = _param(rngs, (L, f, d), ("layers", "mlp", "embed"), dt)
        self.bias = cfg.mlp_bias
        if cfg.mlp_bias:
            self.gate_bias = _param(rngs, (L, f), ("layers", "mlp"), dt, fill=0.0)
            self.up_bias = _param(rngs, (L, f), ("layers", "mlp"), dt, fill=0.0)
            self.down_bias = _param(rngs, (L, d), ("layers", "embed"), dt, fill=0.0)

    def __call__(self, x: Array) -> Array:
        g = jnp.einsum("btd,df->btf", x, self.gate_proj[...])
        u = jnp.einsum("btd,df->btf", x, self.up_proj[...])
        if self.bias:
            g, u = g + self.gate_bias[...], u + self.up_bias[...]
        y = jnp.einsum("btf,fd->btd", jax.nn.silu(g) * u, self.down_proj[...])
        return y + self.down_bias[...] if self.bias else y


class DecoderLayers(nnx.Module):
    """All decoder layers, stacked. `__call__` runs ONE layer on a per-layer slice."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, d, dt = cfg.num_layers, cfg.hidden_size, cfg.jnp_dtype
        self.cfg = cfg
        self.input_norm = _param(rngs, (L, d), ("layers", "embed"), dt, fill=1.0)
        self.post_attention_norm = _param(rngs, (L, d), ("layers", "embed"), dt, fill=1.0)
        self.attn: Any = Attention(cfg, rngs)
        self.mlp = MLP(cfg, rngs)
        self.use_rope = LayerFlag(jnp.asarray(cfg.rope_layers, bool), logical_axes=("layers",))

    def __call__(self, x, positions, valid, cache, memory, control):
        eps = self.cfg.rms_norm_eps
        h = rms_norm(x, self.input_norm[...], eps)
        a, kv, memory = self.attn(h, positions, valid, cache, memory, control, self.use_rope[...])
        x = x + a
        x = x + self.mlp(rms_norm(x, self.post_attention_norm[...], eps))
        return x, kv, memory


class Decoder(nnx.Module):
    """Embeddings → scanned decoder layers → final norm → LM head (tied or not)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = cfg.jnp_dtype
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dt)
        self.layers = DecoderLayers(cfg, rngs)
        self.final_norm = _param(rngs, (cfg.hidden_size,), ("embed",), dt, fill=1.0)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dt)

    def __call__(
        self,
        tokens: Array,  # [b, t] int
        positions: Array,  # [b, t] int (RoPE positions)
        valid: Array,  # [b, t] bool (False = padding)
        cache: KVCache,
        memory: Any = None,  # a pytree whose leaves are stacked over layers, or None
        control: Any = None,  # passed to every attention unchanged (e.g. δ-mem write mode)
        attend_cache: bool = True,  # False: the cache is known empty (a fresh prefill)
        last_only: bool = False,  # logits of the last token only
        head: bool = True,  # False: return the final-normed hidden states [b, t, d], no logits
        remat: bool = False,  # recompute each layer in the backward pass (training memory)
        layer_buffers: LayerBuffers | None = None,  # `split_layers(self)`: loop instead of scan
    ) -> tuple[Array, KVCache, Any]:
        """Returns logits [b, t, v] (or [b, 1, v]), the extended cache and the new memory.

        With `head=False` the first output is the hidden state that `logits` maps to the
        vocabulary, so a write pass that needs no logits never computes them. With
        `layer_buffers` (each layer's parameters as separate arrays) the layers run as an
        unrolled loop over those buffers instead of a scan over the stacked parameters:
        the same layer function (q/k/v projected by one matmul), but on XLA CPU a scan
        copies each layer's weight slice out of the stack every step (see
        `decoding.scan_layers_default`).
        """
        x = self.embed[...][tokens]  # [b, t, d]
        graphdef, stacked = nnx.split(self.layers)
        attend_cache = attend_cache or cache.prefix is not None  # a shared prefix is always attended to
        prefix = cache.prefix
        cache_xs = (cache.k, cache.v, None if prefix is None else (prefix.k, prefix.v)) if attend_cache else None

        def one_layer(x, xs, layer_graph=graphdef):
            state, kv_cache, mem = xs
            layer = nnx.merge(layer_graph, state)
            c = kv_cache
            if kv_cache is not None and not isinstance(kv_cache, CacheSlots):
                ck, cv, pkv = kv_cache
                c = (ck, cv, cache.valid, None if pkv is None else (*pkv, prefix.valid))
            x, kv, mem = layer(x, positions, valid, c, mem, control)
            return x, (kv, mem)

        if remat:
            one_layer = jax.checkpoint(one_layer)
        if cache.per_layer and layer_buffers is None:
            raise ValueError("a per-layer KV cache (KVCache.unstack) needs layer_buffers")
        if layer_buffers is None:
            x, ((k, v), memory) = jax.lax.scan(one_layer, x, (stacked, cache_xs, memory))
            cache = cache.append(k, v, valid)
        else:
            ks, vs, mems = [], [], []
            for i, state in enumerate(layer_buffers.states):
                pkv = None if prefix is None else (prefix.k[i], prefix.v[i])
                if cache.per_layer:  # each layer attends, then writes its own cache in place
                    kv_cache = CacheSlots(cache.k[i], cache.v[i], cache.valid, cache.end, None if pkv is None else (*pkv, prefix.valid))
                else:
                    kv_cache = None if cache_xs is None else (cache.k[i], cache.v[i], pkv)
                mem = jax.tree.map(lambda a: a[i], memory)  # noqa: B023
                x, ((k, v), mem) = one_layer(x, (state, kv_cache, mem), layer_buffers.graphdef)
                ks.append(k), vs.append(v), mems.append(mem)
            memory = jax.tree.map(lambda *a: jnp.stack(a), *mems)
            if cache.per_layer:  # ks, vs are the layers' updated caches
                cache = cache.written(tuple(ks), tuple(vs), valid)
            else:
                cache = cache.append(jnp.stack(ks), jnp.stack(vs), valid)
        if last_only:
            x = x[:, -1:]
        x = rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps)
        if not head:
            return x, cache, memory
        return self.logits(x, None if layer_buffers is None else layer_buffers.head), cache, memory

    def logits(self, x: Array, head: Array | None = None) -> Array:
        """Vocabulary logits (float32) of final-normed hidden states `[..., d]`; with `head`
        [d, v] (`LayerBuffers.head`, the tied embedding transposed) from that instead."""
        if head is not None:
            return jnp.einsum("...d,dv->...v", x, head, preferred_element_type=jnp.float32)
        if self.cfg.tie_word_embeddings:
            return jnp.einsum("...d,vd->...v", x, self.embed[...], preferred_element_type=jnp.float32)
        return jnp.einsum("...d,dv->...v", x, self.lm_head[...], preferred_element_type=jnp.float32)


@struct.dataclass
class LayerBuffers:
    """Each layer's parameters and constants as separate arrays, for
    `Decoder(..., layer_buffers=...)`: the layers' graph (one for all) and their states,
    and the tied embedding transposed as the LM head ([d, v], or None if not tied)."""

    graphdef: Any = struct.field(pytree_node=False)
    states: tuple
    head: Array | None = None


def split_layers(model: Decoder) -> LayerBuffers:
    """A copy of every layer's parameters as separate arrays, its attention's projections
    fused for decode (`fuse_for_decode`: q/k/v as one matmul, and δ-mem's own small
    projections folded into those of the attention when attached); a tied embedding also
    as a transposed copy `[d, v]` for the LM head: XLA CPU streams `x @ W` faster than
    `x @ E.T` contracting the embedding's minor axis (a decode step 4–7% faster at b=1
    and 8 on the AMD EPYC, `scripts/ab_decode_head.py`)."""
    graphdef, state = nnx.split(model.layers)
    layer_graph, states = None, []
    for i in range(model.cfg.num_layers):
        layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))  # noqa: B023
        layer.attn.fuse_for_decode()
        layer_graph, layer_state = nnx.split(layer)
        states.append(layer_state)
    head = jnp.transpose(model.embed[...]) if model.cfg.tie_word_embeddings else None
    return LayerBuffers(graphdef=layer_graph, states=tuple(states), head=head)
