"""The two forms of `models.decoder._step_attention` for ab_group_loop.py / compile_ab.py
(scratch, not maintained): `unrolled` (the Python loop: the library's own function) and
`looped` (its lax.map, the library's in d251319 and reverted: 2-5% slower over 8k slots)."""
import jax
import jax.numpy as jnp

import models.decoder as dec
from models.decoder import _MASKED, _merge, _prefix_part, Array  # noqa: F401

unrolled = dec._step_attention  # the library's form (the lax.map was reverted in ce9c5e8)


def looped(qg: Array, k: Array, v: Array, valid: Array, cache) -> Array:
    """`dense_attention` for one new token (a decode step, t = 1), one query head of each
    group at a time: per KV head, `q [h] @ k [h, s]` and `p [s] @ v [s, h]` over the
    cache (vector-matrix products, batched over rows and KV heads), the token's own key and
    value as element-wise products. Written so, XLA CPU keeps the cache in its layout (with
    a `t` axis in the products, or the token's own score concatenated to the cache's, it
    transposed each layer's keys every step), and the vector-matrix products ran faster
    than the group's `[g, h] @ [h, s]` matmuls although each reads the cache once per query
    head (30 layers on the AMD EPYC: 17.30 against 15.18 ms at b=8 over 528 slots, 11.25
    against 8.69 at b=1 over 2,064, `scripts/ab_cache_layout.py`). The query heads of a
    group go through a `lax.map`, one loop body in the program rather than g copies: a
    decode compiles 16–30% faster and steps as fast (`docs/runs/scratch_s20/ab_group_loop.py`)."""
    b, _, kvh, g, h = qg.shape
    if cache is None:  # the token attends to itself alone
        return jnp.broadcast_to(v[:, :, :, None, :], qg.shape).astype(qg.dtype)
    q = qg[:, 0]  # [b,k,g,h]
    ck, cv, cvalid, prefix = cache
    own_k, own_v = k[:, 0].astype(jnp.float32), v[:, 0].astype(jnp.float32)  # [b,k,h]

    def one_head(qi):  # a query head of each group [b,k,h] -> m, l [b,k], o [b,k,h]
        own = jnp.where(valid, jnp.sum(qi.astype(jnp.float32) * own_k, axis=-1), _MASKED)  # [b,k]
        cs = jnp.einsum("bkh,bkhs->bks", qi, ck, preferred_element_type=jnp.float32)
        cs = jnp.where(cvalid[:, None, :], cs, _MASKED)
        m = jnp.maximum(jnp.max(cs, axis=-1), own)
        e, e_own = jnp.exp(cs - m[..., None]), jnp.exp(own - m)
        o = jnp.einsum("bks,bksh->bkh", e.astype(cv.dtype), cv, preferred_element_type=jnp.float32) + e_own[..., None] * own_v
        return m, jnp.sum(e, axis=-1) + e_own, o

    heads = jax.lax.map(one_head, jnp.moveaxis(q, 2, 0))  # m, l [g,b,k], o [g,b,k,h]
    parts = [tuple(jnp.moveaxis(x, 0, 2) for x in heads)]  # m, l [b,k,g], o [b,k,g,h]
    if prefix is not None:  # one copy for every row: no batch axis on its keys
        m, l, o = _prefix_part(q.transpose(1, 0, 2, 3).reshape(kvh, b * g, h), prefix)
        parts.append((m.reshape(kvh, b, g).transpose(1, 0, 2), l.reshape(kvh, b, g).transpose(1, 0, 2),
                      o.reshape(kvh, b, g, h).transpose(1, 0, 2, 3)))  # fmt: skip
    return _merge(parts)[:, None].astype(qg.dtype)

