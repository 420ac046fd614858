"""The δ-mem recurrence: read-before-write gated delta rule on a tiny r×r state.

Every function here works on one layer's state `S: [b, m, r, r]` (rows are the value
dimension, gated per row; columns the key dimension) and per-token features
`q, k, v, beta, lam, mu: [b, t, m, r]`. All three update modes of the official
code are one recurrence, written per state row i:

    read   r_t[i] = S_{t-1}[i] · q_t                          (read before write)
    error  e_t[i] = beta_t[i] · (v_t[i] − mu_t[i] · S_{t-1}[i] · k_t)
    write  S_t[i] = lam_t[i] · S_{t-1}[i] + e_t[i] · k_tᵀ

    standard        lam = 1 − beta, mu = 1
    no_lambda       lam = 1,        mu = 1
    lambda_outside  lam = λ,        mu = λ   (λ(I − β k kᵀ) form)

An invalid (padding) token neither writes (beta = 0, lam = 1) nor reads (read = 0).

Three writers compute the same thing: `write_step` (one token, decode), `write_scan`
(token loop, the reference) and `write_chunked` (chunkwise-parallel UT form for long
sequences). The state is always float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from deltamem_jax.array_typing import Array, Bool, Float

_HIGHEST = jax.lax.Precision.HIGHEST


class WriteInputs(NamedTuple):
    """Per-token memory features of one layer, all float32 `[b, t, m, r]`."""

    q: Float[Array, "b t m r"]  # read query (unit norm per sub-state when normalized)
    k: Float[Array, "b t m r"]  # write key
    v: Float[Array, "b t m r"]  # write value (one entry per state row)
    beta: Float[Array, "b t m r"]  # write strength per state row
    lam: Float[Array, "b t m r"]  # decay of the old row
    mu: Float[Array, "b t m r"]  # decay applied inside the delta term


def mask_invalid(x: WriteInputs, valid: Bool[Array, "b t"]) -> WriteInputs:
    """Turns invalid tokens into exact no-ops: S_t = S_{t-1} (beta = 0, lam = 1)."""
    keep = valid[:, :, None, None]
    return x._replace(
        beta=jnp.where(keep, x.beta, 0.0),
        lam=jnp.where(keep, x.lam, 1.0),
    )


def read(state: Float[Array, "b m r r"], q: Float[Array, "b t m r"]) -> Float[Array, "b t m r"]:
    """Reads a fixed state with every query (no write): r_t = S q_t."""
    return jnp.einsum("bmij,btmj->btmi", state, q, precision=_HIGHEST)


def _step(state: Float[Array, "b m r r"], x: WriteInputs) -> tuple[Array, Array]:
    """One token for every batch row: x fields are `[b, m, r]`. Returns (read, new state)."""
    # products with the 8×8 state as multiply-adds, not dots: XLA CPU fuses them with the
    # update below into one loop, where each dot was an op of its own (~10 µs per layer and
    # token in decode, `scripts/profile_decode.py --memory msw`)
    both = jnp.sum(state[:, :, None] * jnp.stack([x.q, x.k], 2)[..., None, :], axis=-1)  # [b, m, 2, r]
    r_t, s_k = both[:, :, 0], both[:, :, 1]
    e = x.beta * (x.v - x.mu * s_k)  # [b, m, r]
    new = x.lam[..., None] * state + e[..., :, None] * x.k[..., None, :]
    return r_t, new


def write_step(
    state: Float[Array, "b m r r"], x: WriteInputs, valid: Bool[Array, "b t"]
) -> tuple[Float[Array, "b t m r"], Float[Array, "b m r r"]]:
    """Single-token writer (t = 1): the decode path."""
    x = mask_invalid(x, valid)
    r_t, new = _step(state, jax.tree.map(lambda a: a[:, 0], x))
    return jnp.where(valid[:, :, None, None], r_t[:, None], 0.0), new


def write_scan(
    state: Float[Array, "b m r r"], x: WriteInputs, valid: Bool[Array, "b t"]
) -> tuple[Float[Array, "b t m r"], Float[Array, "b m r r"]]:
    """Token-by-token writer (`lax.scan`): the reference for the chunked form."""
    x = mask_invalid(x, valid)

    def body(s, xt):
        r_t, s = _step(s, xt)
        return s, r_t

    final, reads = jax.lax.scan(body, state, jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), x))
    reads = jnp.moveaxis(reads, 0, 1)  # [b, t, m, r]
    return jnp.where(valid[:, :, None, None], reads, 0.0), final


def write_chunked(
    state: Float[Array, "b m r r"],
    x: WriteInputs,
    valid: Bool[Array, "b t"],
    chunk_size: int = 64,
) -> tuple[Float[Array, "b t m r"], Float[Array, "b m r r"]]:
    """Chunkwise-parallel writer: exact (up to float rounding) equal of `write_scan`.

    Inside a chunk of c tokens starting from state S0, with decays
    P[j, a] = Π_{j<u≤a} lam_u (an exact cumulative product, never a ratio, so
    saturated gates with lam = 0 are safe) the errors solve a unit lower-triangular
    system (the UT transform, per state row i):

        e_t + Σ_{j<t} beta_t mu_t P[j, t-1] (k_t·k_j) e_j = beta_t v_t − beta_t mu_t Γ_{t-1} (S0 · k_t)

    with Γ_{t-1} = Π_{u<t} lam_u. The solve is a triangular substitution (no series
    expansion), done once per chunk for the S0-free part (U) and the S0 coefficient (W),
    so only `e = U − W S0`, the reads and the chunk's final state run sequentially.
    """
    b, t, m, r = x.q.shape
    x = mask_invalid(x, valid)
    c = min(chunk_size, t)
    n = -(-t // c)
    pad = n * c - t
    if pad:
        x = WriteInputs(*(jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in x))
        x = x._replace(lam=x.lam.at[:, t:].set(1.0))  # padded steps: beta = 0, lam = 1
    # [b, t, m, r] -> [b, m, n, c, r]
    q, k, v, beta, lam, mu = (a.reshape(b, n, c, m, r).transpose(0, 3, 1, 2, 4) for a in x)

    lam_rows = jnp.swapaxes(lam, -1, -2)  # [b, m, n, i, c]: per state row, over time
    idx = jnp.arange(c)
    later = idx[None, :] > idx[:, None]  # [j, a]: a > j
    # P[..., j, a] = Π_{j<u≤a} lam_u (1 for a ≤ j)
    p = jnp.cumprod(jnp.where(later, lam_rows[..., None, :], 1.0), axis=-1)  # [b,m,n,i,j,a]
    # D[..., t, j] = P[j, t-1] for j < t: decay strictly between j and t
    strictly_lower = idx[:, None] > idx[None, :]  # [t, j]
    d = jnp.swapaxes(p, -1, -2)  # [.., a, j]
    d = jnp.concatenate([jnp.zeros_like(d[..., :1, :]), d[..., :-1, :]], axis=-2)
    d = jnp.where(strictly_lower, d, 0.0)  # [b, m, n, i, t, j]
    d_end = p[..., :, -1]  # [b, m, n, i, j]: Π_{j<u≤c} lam_u
    gamma = jnp.cumprod(lam_rows, axis=-1)  # [b, m, n, i, a]: Π_{u≤a} lam_u
    gamma_before = jnp.concatenate([jnp.ones_like(gamma[..., :1]), gamma[..., :-1]], axis=-1)
    gamma_end = gamma[..., -1]  # [b, m, n, i]

    kk = jnp.einsum("bmntc,bmnjc->bmntj", k, k, precision=_HIGHEST)
    qk = jnp.einsum("bmntc,bmnjc->bmntj", q, k, precision=_HIGHEST)
    bm = jnp.swapaxes(beta * mu, -1, -2)  # [b, m, n, i, t]
    a_mat = bm[..., :, None] * d * kk[:, :, :, None]  # [b, m, n, i, t, j], strictly lower
    eye = jnp.eye(c, dtype=a_mat.dtype)
    rhs_u = jnp.swapaxes(beta * v, -1, -2)[..., None]  # [b, m, n, i, t, 1]
    rhs_w = (bm * gamma_before)[..., None] * k[:, :, :, None]  # [b, m, n, i, t, c']
    sol = jax.scipy.linalg.solve_triangular(
        eye + a_mat, jnp.concatenate([rhs_u, rhs_w], axis=-1), lower=True, unit_diagonal=True
    )
    u, w = sol[..., 0], sol[..., 1:]  # [b,m,n,i,t], [b,m,n,i,t,c']
    read_mix = d * qk[:, :, :, None]  # [b, m, n, i, t, j]

    def chunk(s, xs):
        u, w, read_mix, gamma_before, gamma_end, d_end, q, k = xs
        e = u - jnp.einsum("bmitc,bmic->bmit", w, s, precision=_HIGHEST)
        reads = gamma_before * jnp.einsum("bmic,bmtc->bmit", s, q, precision=_HIGHEST)
        reads = reads + jnp.einsum("bmitj,bmij->bmit", read_mix, e, precision=_HIGHEST)
        s = gamma_end[..., None] * s + jnp.einsum(
            "bmij,bmjc->bmic", d_end * e, k, precision=_HIGHEST
        )
        return s, reads

    per_chunk = (u, w, read_mix, gamma_before, gamma_end, d_end, q, k)
    final, reads = jax.lax.scan(chunk, state, jax.tree.map(lambda a: jnp.moveaxis(a, 2, 0), per_chunk))
    # reads: [n, b, m, i, c] -> [b, n*c, m, i]
    reads = reads.transpose(1, 0, 4, 2, 3).reshape(b, n * c, m, r)[:, :t]
    return jnp.where(valid[:, :, None, None], reads, 0.0), final
