"""Tests of the δ-mem recurrence (`deltamem_jax.delta_rule`) against an independent oracle.

The oracle is a float64 NumPy token loop written from the spec (DELTA_MEM.md §3), per
batch row and per sub-state:

    read   r_t = S_{t-1} q_t                      (read BEFORE write)
    error  e_t = beta_t * (v_t - mu_t * S_{t-1} k_t)
    write  S_t = diag(lam_t) S_{t-1} + e_t k_tᵀ
    invalid token: no write, read = 0

    standard        lam = 1 - beta, mu = 1
    no_lambda       lam = 1,        mu = 1
    lambda_outside  lam = 1 - beta, mu = lam

The oracle derives lam and mu from beta itself (in float64), so it also checks that the
features fed to the library mean what the spec says.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deltamem_jax.delta_rule import (
    WriteInputs,
    mask_invalid,
    read,
    write_chunked,
    write_scan,
    write_step,
)

R = 8
B = 5  # rows: all valid, left-padded, right-padded (ragged), random mask, fully invalid
MODES = ("standard", "no_lambda", "lambda_outside")
SCENARIOS = ("random", "saturated", "aligned", "aligned_saturated")
LENGTHS = (1, 7, 37, 130)
CHUNKS = (1, 3, 8, 16, 64, "gt_t")  # "gt_t": one chunk size larger than t
ATOL = 1e-5

_scan = jax.jit(write_scan)
_chunked = jax.jit(write_chunked, static_argnames="chunk_size")
_step = jax.jit(write_step)
_read = jax.jit(read)


# --------------------------------------------------------------------------- features


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def _sigmoid64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def _lam_mu(beta, mode: str):
    """lam, mu from beta for an update mode (works for NumPy float32/float64 alike)."""
    one = np.ones_like(beta)
    if mode == "standard":
        return one - beta, one
    if mode == "no_lambda":
        return one, one
    if mode == "lambda_outside":
        lam = one - beta
        return lam, lam
    raise ValueError(mode)


def make_valid(b: int, t: int, rng: np.random.Generator) -> np.ndarray:
    assert b == B
    valid = np.ones((b, t), bool)
    valid[1, : max(1, t // 3)] = False  # left padding (t = 1: the row is all padding)
    valid[2, max(1, (2 * t) // 3) :] = False  # right padding: ragged length
    valid[3] = rng.random(t) < 0.6  # random mask
    valid[4] = False  # fully invalid row
    return valid


def make_features(seed: int, b: int, t: int, m: int, mode: str, scenario: str):
    """Returns (state0 f32 [b,m,r,r], WriteInputs f32 [b,t,m,r], valid bool [b,t])."""
    rng = np.random.default_rng(seed)
    shape = (b, t, m, R)
    q = _l2n(np.tanh(rng.normal(size=shape)))
    if scenario.startswith("aligned"):
        k0 = _l2n(np.tanh(rng.normal(size=(1, 1, m, R))))  # one key for every token
        k = np.broadcast_to(k0, shape).copy()
    else:
        k = _l2n(np.tanh(rng.normal(size=shape)))
    v = rng.normal(size=shape)
    if scenario.endswith("saturated"):
        # sigmoid of large logits (most are exactly 1.0 / ~0 in float32) ...
        logits = rng.choice([-1.0, 1.0], size=shape) * rng.uniform(20.0, 150.0, size=shape)
        logits = np.where(rng.random(shape) < 0.25, rng.normal(size=shape), logits)
        beta = _sigmoid64(logits).astype(np.float32)
        # ... and gates set exactly to 1.0 / 0.0 on whole tokens
        tok = rng.random((b, t, 1, 1))
        beta = np.where(tok < 0.2, np.float32(1.0), beta)
        beta = np.where(tok > 0.85, np.float32(0.0), beta)
    else:
        beta = _sigmoid64(1.5 * rng.normal(size=shape) - 0.5).astype(np.float32)
    lam, mu = _lam_mu(beta, mode)
    state0 = (0.5 * rng.normal(size=(b, m, R, R))).astype(np.float32)
    f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))  # noqa: E731
    x = WriteInputs(f32(q), f32(k), f32(v), f32(beta), f32(lam), f32(mu))
    return f32(state0), x, jnp.asarray(make_valid(b, t, rng))


# --------------------------------------------------------------------------- oracle


def oracle(state0, x: WriteInputs, valid, mode: str):
    """float64 token loop from the spec; lam and mu are derived from beta here."""
    s_all = np.asarray(state0, np.float64).copy()
    q, k, v, beta = (np.asarray(a, np.float64) for a in (x.q, x.k, x.v, x.beta))
    lam, mu = _lam_mu(beta, mode)
    valid = np.asarray(valid)
    b, t, m, r = q.shape
    reads = np.zeros((b, t, m, r))
    for bi in range(b):
        for mi in range(m):
            s = s_all[bi, mi]
            for ti in range(t):
                if not valid[bi, ti]:
                    continue  # no write, read stays 0
                kt = k[bi, ti, mi]
                reads[bi, ti, mi] = s @ q[bi, ti, mi]  # read before write
                e = beta[bi, ti, mi] * (v[bi, ti, mi] - mu[bi, ti, mi] * (s @ kt))
                s = lam[bi, ti, mi][:, None] * s + np.outer(e, kt)
            s_all[bi, mi] = s
    return reads, s_all


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))


# Largest errors seen, printed at the end of the session (pytest -s) for the report.
MAX_ERR: dict[str, float] = {}


def _record(key: str, err: float) -> None:
    MAX_ERR[key] = max(MAX_ERR.get(key, 0.0), err)


@pytest.fixture(scope="module", autouse=True)
def _report_max_errors():
    yield
    if MAX_ERR:
        print("\nmax abs errors: " + ", ".join(f"{k}={v:.2e}" for k, v in sorted(MAX_ERR.items())))


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("m", (1, 4))
@pytest.mark.parametrize("t", LENGTHS)
def test_scan_and_chunked_match_oracle(t, m, scenario, mode):
    seed = 1000 * t + 100 * m + 10 * SCENARIOS.index(scenario) + MODES.index(mode)
    state0, x, valid = make_features(seed, B, t, m, mode, scenario)
    want_reads, want_state = oracle(state0, x, valid, mode)

    reads, final = _scan(state0, x, valid)
    chex.assert_shape(reads, (B, t, m, R))
    chex.assert_shape(final, (B, m, R, R))
    chex.assert_type([reads, final], jnp.float32)
    errs = {"scan": (_max_err(reads, want_reads), _max_err(final, want_state))}

    for cs in CHUNKS:
        cs = t + 5 if cs == "gt_t" else cs
        reads_c, final_c = _chunked(state0, x, valid, chunk_size=cs)
        chex.assert_shape(reads_c, (B, t, m, R))
        chex.assert_shape(final_c, (B, m, R, R))
        chex.assert_type([reads_c, final_c], jnp.float32)
        errs[f"chunked{cs}"] = (_max_err(reads_c, want_reads), _max_err(final_c, want_state))

    for name, (er, es) in errs.items():
        _record(f"fwd_{name.rstrip('0123456789')}", max(er, es))
    bad = {n: e for n, e in errs.items() if max(e) > ATOL}
    assert not bad, f"(reads, state) max abs error over {ATOL}: {bad}"

    # invalid tokens read exactly 0; the fully invalid row keeps its state bit for bit
    assert np.all(np.asarray(reads)[~np.asarray(valid)] == 0.0)
    np.testing.assert_array_equal(np.asarray(final)[4], np.asarray(state0)[4])
    np.testing.assert_array_equal(np.asarray(final_c)[4], np.asarray(state0)[4])


@pytest.mark.parametrize("mode", MODES)
def test_write_step_token_by_token_equals_scan(mode):
    t, m = 37, 4
    state0, x, valid = make_features(7, B, t, m, mode, "saturated")
    reads_scan, final_scan = _scan(state0, x, valid)
    s = state0
    reads = []
    for ti in range(t):
        xt = WriteInputs(*(a[:, ti : ti + 1] for a in x))
        r_t, s = _step(s, xt, valid[:, ti : ti + 1])
        chex.assert_shape(r_t, (B, 1, m, R))
        chex.assert_shape(s, (B, m, R, R))
        chex.assert_type([r_t, s], jnp.float32)
        reads.append(r_t)
    reads = jnp.concatenate(reads, axis=1)
    err = max(_max_err(reads, reads_scan), _max_err(s, final_scan))
    _record("step_vs_scan", err)
    assert err <= 1e-6, err
    want_reads, want_state = oracle(state0, x, valid, mode)
    assert max(_max_err(reads, want_reads), _max_err(s, want_state)) <= ATOL


@pytest.mark.parametrize("m", (1, 4))
def test_read_equals_state_times_query(m):
    rng = np.random.default_rng(3)
    state = rng.normal(size=(3, m, R, R)).astype(np.float32)
    q = _l2n(np.tanh(rng.normal(size=(3, 11, m, R)))).astype(np.float32)
    out = _read(jnp.asarray(state), jnp.asarray(q))
    chex.assert_shape(out, (3, 11, m, R))
    chex.assert_type(out, jnp.float32)
    want = np.einsum("bmij,btmj->btmi", state.astype(np.float64), q.astype(np.float64))
    err = _max_err(out, want)
    _record("read", err)
    assert err <= 1e-6, err


def test_mask_invalid_makes_no_ops():
    state0, x, valid = make_features(5, B, 7, 4, "lambda_outside", "random")
    xm = mask_invalid(x, valid)
    chex.assert_trees_all_equal_shapes(xm, x)
    inv = ~np.asarray(valid)
    assert np.all(np.asarray(xm.beta)[inv] == 0.0)
    assert np.all(np.asarray(xm.lam)[inv] == 1.0)
    for name in WriteInputs._fields:
        got, ref = np.asarray(getattr(xm, name)), np.asarray(getattr(x, name))
        np.testing.assert_array_equal(got[~inv], ref[~inv])
        if name not in ("beta", "lam"):
            np.testing.assert_array_equal(got, ref)


def test_float64_chunked_is_algebraically_exact():
    """Run in float64 the chunked form equals the oracle to ~1e-12 (no hidden approximations)."""
    t, m = 37, 4
    with jax.enable_x64(True):
        for mode in MODES:
            for scenario in ("random", "aligned_saturated"):
                state0, x, valid = make_features(11, B, t, m, mode, scenario)
                want_reads, want_state = oracle(state0, x, valid, mode)
                to64 = lambda a: jnp.asarray(np.asarray(a, np.float64))  # noqa: E731
                s64, x64 = to64(state0), WriteInputs(*(to64(a) for a in x))
                # lam/mu recomputed in float64 so the inputs equal the oracle's exactly
                lam, mu = _lam_mu(np.asarray(x64.beta), mode)
                x64 = x64._replace(lam=jnp.asarray(lam), mu=jnp.asarray(mu))
                for cs in (3, 64):
                    reads, final = _chunked(s64, x64, valid, chunk_size=cs)
                    assert reads.dtype == jnp.float64
                    err = max(_max_err(reads, want_reads), _max_err(final, want_state))
                    _record("fwd_chunked_float64", err)
                    assert err <= 1e-11, (mode, scenario, cs, err)


# --------------------------------------------------------------------------- boundedness


def test_long_stream_stays_bounded():
    """standard mode, 2000 tokens. Per state row i with ‖k‖ = 1:

        S_t[i] = S_{t-1}[i] ((1-β) I - β k kᵀ) + β v[i] kᵀ

    and ‖(1-β) I - β k kᵀ‖₂ = ρ(β) = max(1-β, |1-2β|), so ‖S_t[i]‖ ≤ ρ ‖S_{t-1}[i]‖ + β |v[i]|.
    Unrolled, this gives a true running bound. For β ≤ 2/3, ρ + β = 1 and the bound is the
    simple max(‖S_0[i]‖, max_t |v_t[i]|); for β > 2/3 it is not (β = 1 with one fixed key
    gives a_t = v_t − a_{t−1}), so the closed form is max(‖S_0[i]‖, max_t β|v|/(1−ρ)).
    """
    t, m = 2000, 2
    rng = np.random.default_rng(2000)
    b = 2
    shape = (b, t, m, R)
    q = _l2n(np.tanh(rng.normal(size=shape)))
    k = _l2n(np.tanh(rng.normal(size=shape)))
    v = rng.normal(size=shape) * 3.0
    # row 0: gates capped at 2/3 (sigmoid(x) ≤ 2/3 ⇔ x ≤ ln 2); row 1: unrestricted gates
    logits = rng.normal(size=shape) * 2.0
    logits[0] = np.minimum(logits[0], np.log(2.0) - 1e-3)
    beta = _sigmoid64(logits).astype(np.float32)
    lam, mu = _lam_mu(beta, "standard")
    state0 = (2.0 * rng.normal(size=(b, m, R, R))).astype(np.float32)
    f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))  # noqa: E731
    x = WriteInputs(f32(q), f32(k), f32(v), f32(beta), f32(lam), f32(mu))
    valid = jnp.ones((b, t), bool)
    s0 = f32(state0)

    @jax.jit
    def all_states(s, x, valid):
        def body(s, xv):
            xt, vt = xv
            _, s = write_step(s, jax.tree.map(lambda a: a[:, None], xt), vt[:, None])
            return s, s

        xs = (jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), x), valid.T)
        return jax.lax.scan(body, s, xs)

    final, states = all_states(s0, x, valid)  # states: [t, b, m, r, r]
    norms = np.linalg.norm(np.asarray(states, np.float64), axis=-1)  # [t, b, m, r]
    assert np.all(np.isfinite(norms))

    beta64 = np.asarray(x.beta, np.float64)
    vabs = np.abs(np.asarray(x.v, np.float64))
    rho = np.maximum(1.0 - beta64, np.abs(1.0 - 2.0 * beta64))
    bound = np.linalg.norm(state0.astype(np.float64), axis=-1)  # [b, m, r]
    running = np.empty_like(norms)
    for ti in range(t):
        bound = rho[:, ti] * bound + beta64[:, ti] * vabs[:, ti]
        running[ti] = bound
    slack = 1e-5 * (1.0 + running)
    assert np.all(norms <= running + slack), float(np.max(norms - running))

    # closed-form bounds
    s0_rows = np.linalg.norm(state0.astype(np.float64), axis=-1)  # [b, m, r]
    simple = np.maximum(s0_rows[0], vabs[0].max(axis=0))  # row 0: β ≤ 2/3
    assert np.all(norms[:, 0] <= simple + 1e-5 * (1 + simple))
    with np.errstate(divide="ignore"):
        ratio = np.where(beta64 > 0, beta64 * vabs / np.maximum(1.0 - rho, 1e-300), 0.0)
    closed = np.maximum(s0_rows, ratio.max(axis=1))
    assert np.all(norms.max(axis=0) <= closed + 1e-5 * (1 + closed))

    # the long stream through scan and chunked agrees with the step loop
    reads_s, final_s = _scan(s0, x, valid)
    reads_c, final_c = _chunked(s0, x, valid, chunk_size=64)
    chex.assert_shape([reads_s, reads_c], (b, t, m, R))
    chex.assert_shape([final, final_s, final_c], (b, m, R, R))
    err = max(_max_err(final_s, final), _max_err(final_c, final), _max_err(reads_c, reads_s))
    _record("long_stream_2000", err)
    assert err <= ATOL, err


def test_spec_simple_bound_needs_beta_at_most_two_thirds():
    """Documents the true behaviour: β = 1 with one fixed key flips a = S k ↦ v − a, so with
    alternating values the state grows linearly (not a contraction), and every writer agrees."""
    t, m = 20, 1
    k0 = _l2n(np.ones(R))
    k = np.broadcast_to(k0, (B, t, m, R)).astype(np.float32)
    q = k.copy()
    v = np.broadcast_to(((-1.0) ** np.arange(t))[None, :, None, None], (B, t, m, R)).astype(np.float32)
    beta = np.ones((B, t, m, R), np.float32)
    lam, mu = _lam_mu(beta, "standard")
    x = WriteInputs(*(jnp.asarray(a) for a in (q, k, v, beta, lam, mu)))
    valid = jnp.ones((B, t), bool)
    s0 = jnp.zeros((B, m, R, R), jnp.float32)
    _, want_state = oracle(s0, x, valid, "standard")
    a = want_state[0, 0] @ k0
    assert np.allclose(np.abs(a), t)  # |S k| = t > max|v| = 1
    for reads, final in (_scan(s0, x, valid), _chunked(s0, x, valid, chunk_size=8)):
        assert _max_err(final, want_state) <= ATOL


# --------------------------------------------------------------------------- gradients


def _loss_weights(seed, b, t, m):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(size=(b, t, m, R)).astype(np.float32)),
        jnp.asarray(rng.normal(size=(b, m, R, R)).astype(np.float32)),
    )


def _loss(writer, state0, x, valid, w_reads, w_state):
    reads, final = writer(state0, x, valid)
    return jnp.sum(reads * w_reads) + jnp.sum(final * w_state)


def _oracle_jnp(state0, x: WriteInputs, valid):
    """Independent jnp token loop (any dtype), all six fields as free inputs, for jax.grad."""

    def body(s, inp):
        q, k, v, beta, lam, mu, ok = inp  # [b, m, r] ..., ok: [b]
        r_t = jnp.sum(s * q[..., None, :], axis=-1)
        e = beta * (v - mu * jnp.sum(s * k[..., None, :], axis=-1))
        new = lam[..., None] * s + e[..., :, None] * k[..., None, :]
        ok = ok[:, None, None, None]
        return jnp.where(ok, new, s), jnp.where(ok[..., 0], r_t, 0.0)

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in x) + (valid.T,)
    final, reads = jax.lax.scan(body, state0, xs)
    return jnp.moveaxis(reads, 0, 1), final


@functools.cache
def _grad_fn(kind: str, chunk_size: int | None = None):
    writer = {
        "scan": write_scan,
        "chunked": functools.partial(write_chunked, chunk_size=chunk_size),
        "oracle": _oracle_jnp,
    }[kind]
    return jax.jit(jax.grad(functools.partial(_loss, writer), argnums=(0, 1)))


def _flat_grads(g):
    gs, gx = g
    return {"state0": gs, **{f: getattr(gx, f) for f in WriteInputs._fields}}


GRAD_T, GRAD_M = 37, 4


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scenario", ("random", "saturated", "aligned", "aligned_saturated"))
def test_gradients(scenario, mode):
    t, m = GRAD_T, GRAD_M
    seed = 77 + SCENARIOS.index(scenario) * 10 + MODES.index(mode)
    state0, x, valid = make_features(seed, B, t, m, mode, scenario)
    w_reads, w_state = _loss_weights(seed + 1, B, t, m)

    g_scan = _flat_grads(_grad_fn("scan")(state0, x, valid, w_reads, w_state))
    for name, g in g_scan.items():
        chex.assert_shape(g, state0.shape if name == "state0" else x.q.shape)
        chex.assert_tree_all_finite(g)

    # float64 reference: jax.grad of an independent jnp loop with x64 enabled
    with jax.enable_x64(True):
        to64 = lambda a: jnp.asarray(np.asarray(a, np.float64))  # noqa: E731
        g64 = _flat_grads(
            _grad_fn("oracle")(
                to64(state0), WriteInputs(*(to64(a) for a in x)), valid, to64(w_reads), to64(w_state)
            )
        )
        g64 = {n: np.asarray(g, np.float64) for n, g in g64.items()}
    scale = max(1.0, max(float(np.max(np.abs(g))) for g in g64.values()))

    def errs(gs):
        return {n: _max_err(gs[n], g64[n]) for n in g64}

    report = {"scan": errs(g_scan)}
    for cs in (8, 64):  # 64 > t: one chunk
        g_c = _flat_grads(_grad_fn("chunked", cs)(state0, x, valid, w_reads, w_state))
        chex.assert_tree_all_finite(g_c)
        report[f"chunked{cs}"] = errs(g_c)
        report[f"chunked{cs}_vs_scan"] = {n: _max_err(g_c[n], g_scan[n]) for n in g_c}

    for name, e in report.items():
        _record(f"grad_{name}", max(e.values()))
        _record(f"grad_{name}_scaled", max(e.values()) / scale)
    # plain atol holds (largest |g| here is ~25); `scale` is only reported
    bad = {n: {f: v for f, v in e.items() if v > ATOL} for n, e in report.items()}
    bad = {n: e for n, e in bad.items() if e}
    assert not bad, f"gradient errors over {ATOL} (max|g64| = {scale:.3g}): {bad}"


def test_oracle_gradient_matches_finite_differences():
    """Guards the float64 gradient reference itself with central differences."""
    t, m = 7, 4
    state0, x, valid = make_features(99, B, t, m, "standard", "random")
    w_reads, w_state = _loss_weights(100, B, t, m)
    rng = np.random.default_rng(101)
    with jax.enable_x64(True):
        to64 = lambda a: jnp.asarray(np.asarray(a, np.float64))  # noqa: E731
        s64, x64 = to64(state0), WriteInputs(*(to64(a) for a in x))
        wr, ws = to64(w_reads), to64(w_state)
        gs, gx = _grad_fn("oracle")(s64, x64, valid, wr, ws)
        ds = to64(rng.normal(size=state0.shape))
        dx = WriteInputs(*(to64(rng.normal(size=x.q.shape)) for _ in x))
        f = jax.jit(functools.partial(_loss, _oracle_jnp))
        eps = 1e-6
        shift = lambda c: (  # noqa: E731
            s64 + c * ds,
            WriteInputs(*(a + c * d for a, d in zip(x64, dx))),
        )
        fd = (f(*shift(eps), valid, wr, ws) - f(*shift(-eps), valid, wr, ws)) / (2 * eps)
        an = jnp.sum(gs * ds) + sum(jnp.sum(g * d) for g, d in zip(gx, dx))
        assert abs(float(fd) - float(an)) <= 1e-6 * max(1.0, abs(float(an))), (float(fd), float(an))
