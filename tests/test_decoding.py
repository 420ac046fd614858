"""Tests of generation with memory (`deltamem_jax.decoding`) on the tiny official fixtures.

The reference for everything the decode loop does is ONE `forward` over the whole
sequence (prompt + generated tokens), unpadded, from a zero memory with TOKENS writes:
the prefill + token-by-token decode must give the same logits at every step and the same
final memory, whatever the padding, the batch mates, the chunking of the prompt writer or
the stop tokens.

Compilation is the cost here (a few seconds per shape on CPU), so the tests share a few
shapes on purpose: the "canonical" batch is two prompts (20 and 14 tokens) left-padded to
32, with 12 new tokens (KV cache 32 + 16 = 48), on the TSW adapter with `chunk_size=16`
(so the 32-token prefill runs the chunked writer over two chunks).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from deltamem_jax import DeltaMemConfig, MemoryState, attach, forward, load_adapter, memory_of
from deltamem_jax.decoding import DecodeState, Sampling, bucket, decode, generate, greedy, left_pad, prefill, sample, stream
from deltamem_jax.state import WriteControl
from models.config import ModelConfig
from models.decoder import KVCache, SharedPrefix

gen_module = importlib.import_module("deltamem_jax.decoding")  # for its private `_decode_jitted`

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official_tiny"

LOGIT_TOL, STATE_TOL = 1e-4, 1e-5
N_NEW = 12  # canonical new tokens
PAD_LEN = 32  # canonical padded prompt length
CACHE_LEN = PAD_LEN + bucket(N_NEW)  # what `generate` allocates: 48
STOP_AT = 5  # index, in row 0's canonical reply, of the token used as a stop id


# ---------------------------------------------------------------------------- helpers


def _load(scenario: str, chunk_size: int | None = None):
    """The fixture model with the chunked writer forced (on CPU "auto" picks the scan), so
    one-forward prefills here exercise the chunked form against step-by-step decode."""
    model, cfg = models.load_pretrained(FIXTURES / scenario / "backbone")
    load_adapter(model, FIXTURES / scenario / "adapter")
    mem = memory_of(model)
    mem.config = dataclasses.replace(mem.config, writer="chunked", chunk_size=chunk_size or mem.config.chunk_size)
    return model, cfg


def _zeros(model, batch: int) -> MemoryState:
    return MemoryState.zeros(model.cfg.num_layers, batch, memory_of(model).config)


def _arange(b: int, t: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def _reference(model, rows) -> tuple[np.ndarray, np.ndarray]:
    """One forward over equal-length unpadded sequences from a zero memory (TOKENS writes).

    Returns logits `[b, t, v]` and the memory `[l, b, m, r, r]`.
    """
    tokens = jnp.asarray(np.asarray(rows, np.int32))
    b, t = tokens.shape
    logits, _, mem = forward(
        model, tokens, _arange(b, t), jnp.ones((b, t), bool), KVCache.create(model.cfg, b, t), _zeros(model, b),
        attend_cache=False,
    )
    return np.asarray(logits), np.asarray(mem.S)


def _close(actual, expected, atol, what=""):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=0, atol=atol, err_msg=what)


def _first_stop(row, stop_ids) -> int | None:
    return next((i for i, t in enumerate(row) if t in stop_ids), None)


def _counting_decode(counter: list):
    """A fresh jit of `_decode` that counts (and chex-limits) its traces."""
    raw = gen_module._decode

    @functools.wraps(raw)
    def counted(*args, **kwargs):
        counter.append(kwargs.get("steps", args[6] if len(args) > 6 else None))
        return raw(*args, **kwargs)

    return jax.jit(
        chex.assert_max_traces(counted, n=1),
        static_argnames=("graphdef", "steps", "sampling", "write"),
        donate_argnames=("state",),
    )


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tsw():
    """The TSW adapter with a 16-token writer chunk (shared; never mutated by tests)."""
    model, _ = _load("tsw", chunk_size=16)
    return model


@pytest.fixture(scope="module")
def plain():
    model, _ = models.load_pretrained(FIXTURES / "tsw" / "backbone")
    return model


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(12)
    return [rng.integers(1, 256, 20).tolist(), rng.integers(1, 256, 14).tolist()]


@pytest.fixture(scope="module")
def canonical(tsw, prompts):
    """Greedy replies and memory of the canonical batch (no stop ids)."""
    replies, mem = generate(tsw, prompts, N_NEW)
    return replies, np.asarray(mem.S)


@pytest.fixture(scope="module")
def _traced_decode():
    traces: list = []
    return _counting_decode(traces), traces


@pytest.fixture
def decode_traces(_traced_decode, monkeypatch):
    """Routes `decode` through one counting jit of `_decode`, shared by the tests of this
    module (so are its compiled programs). Yields the module-wide list of the step counts
    it was traced for; `chex.assert_max_traces(n=1)` fails a test that traces it twice.
    """
    fn, traces = _traced_decode
    chex.clear_trace_counter()
    monkeypatch.setattr(gen_module, "_decode_jitted", lambda: fn)
    yield traces
    chex.clear_trace_counter()


def _canonical_state(model, prompts, memory="zeros") -> DecodeState:
    tokens, positions, valid = left_pad(prompts, PAD_LEN)
    mem = _zeros(model, len(prompts)) if isinstance(memory, str) else memory
    return prefill(model, tokens, positions, valid, KVCache.create(model.cfg, len(prompts), CACHE_LEN), mem)


# ---------------------------------------------------------------------------- (a) decode = one forward


@pytest.mark.parametrize(
    "scenario, chunk_size, prompt_len, cache_len, steps",
    [
        ("tsw", 16, PAD_LEN, CACHE_LEN, N_NEW),  # prompt of 2 writer chunks (canonical shapes)
        ("msw", None, 150, 156, 6),  # 4 sub-states; 150 tokens = 3 chunks of 64, the last padded
    ],
)
def test_stepwise_decode_matches_one_forward(tsw, scenario, chunk_size, prompt_len, cache_len, steps):
    model = tsw if scenario == "tsw" else _load(scenario, chunk_size)[0]
    config = memory_of(model).config
    assert config.chunk_size < prompt_len  # the prefill runs the chunked writer
    cfg = model.cfg
    L, V, m, r = cfg.num_layers, cfg.vocab_size, config.num_state_heads, config.rank
    b = 2
    prompt = np.random.default_rng(prompt_len).integers(1, V, (b, prompt_len)).astype(np.int32)

    state = prefill(
        model, jnp.asarray(prompt), _arange(b, prompt_len), jnp.ones((b, prompt_len), bool),
        KVCache.create(cfg, b, cache_len), _zeros(model, b),
    )
    chex.assert_shape(state.logits, (b, V))
    chex.assert_type(state.logits, jnp.float32)
    chex.assert_shape(state.memory.S, (L, b, m, r, r))
    chex.assert_shape([state.positions, state.done], (b,))
    np.testing.assert_array_equal(state.positions, [prompt_len] * b)
    assert int(state.cache.end) == prompt_len

    step_logits, tokens = [np.asarray(state.logits)], []
    for _ in range(steps):
        state, tok, live = decode(model, state, 1)  # greedy
        chex.assert_shape([tok, live], (b, 1))
        chex.assert_type(tok, jnp.int32)
        assert bool(jnp.all(live))
        step_logits.append(np.asarray(state.logits))
        tokens.append(np.asarray(tok))
    tokens = np.concatenate(tokens, axis=1)  # [b, steps]
    np.testing.assert_array_equal(state.positions, [prompt_len + steps] * b)
    assert int(state.cache.end) == prompt_len + steps
    assert not bool(jnp.any(state.done))

    ref_logits, ref_S = _reference(model, np.concatenate([prompt, tokens], axis=1))
    # the logits after feeding each token (the prompt's last, then every generated one)
    _close(np.stack(step_logits, axis=1), ref_logits[:, prompt_len - 1 :], LOGIT_TOL, "per-step logits")
    _close(state.memory.S, ref_S, STATE_TOL, "memory after decode")
    np.testing.assert_array_equal(tokens, ref_logits[:, prompt_len - 1 : -1].argmax(-1))
    assert np.abs(ref_S).max() > 1e-2  # the memory was really written


def test_one_scan_equals_single_steps(tsw):
    """`decode(n)` in one scan = the same n greedy tokens, logits and memory as n calls of 1."""
    b, V = 2, tsw.cfg.vocab_size
    prompt = jnp.asarray(np.random.default_rng(PAD_LEN).integers(1, V, (b, PAD_LEN)).astype(np.int32))

    def fresh():
        return prefill(tsw, prompt, _arange(b, PAD_LEN), jnp.ones((b, PAD_LEN), bool), KVCache.create(tsw.cfg, b, CACHE_LEN), _zeros(tsw, b))

    one, tokens, live = decode(tsw, fresh(), N_NEW)
    chex.assert_shape([tokens, live], (b, N_NEW))
    assert bool(jnp.all(live))
    many = fresh()
    steps = []
    for _ in range(N_NEW):
        many, tok, _ = decode(tsw, many, 1)
        steps.append(np.asarray(tok))
    np.testing.assert_array_equal(tokens, np.concatenate(steps, axis=1))
    _close(one.logits, many.logits, 1e-5)
    _close(one.memory.S, many.memory.S, 1e-6)
    np.testing.assert_array_equal(one.positions, many.positions)


def test_per_layer_buffers_equal_the_layer_scan(tsw):
    """Decode over per-layer weight copies and a per-layer cache written in place (the CPU
    default) = decode over the stacked layers with a scan: same tokens, logits, memory and
    cache."""
    b, V = 2, tsw.cfg.vocab_size
    prompt = jnp.asarray(np.random.default_rng(7).integers(1, V, (b, PAD_LEN)).astype(np.int32))

    def fresh():
        return prefill(tsw, prompt, _arange(b, PAD_LEN), jnp.ones((b, PAD_LEN), bool), KVCache.create(tsw.cfg, b, CACHE_LEN), _zeros(tsw, b))

    scan, tok_scan, _ = decode(tsw, fresh(), N_NEW, scan_layers=True)
    loop, tok_loop, _ = decode(tsw, fresh(), N_NEW, scan_layers=False)
    np.testing.assert_array_equal(tok_loop, tok_scan)
    _close(loop.logits, scan.logits, 1e-5)
    _close(loop.memory.S, scan.memory.S, 1e-6)
    assert loop.cache.per_layer and not scan.cache.per_layer  # the loop's cache stays per layer for the next call
    _close(loop.cache.stack().k, scan.cache.k, 1e-6)
    _close(loop.cache.stack().v, scan.cache.v, 1e-6)
    np.testing.assert_array_equal(loop.cache.valid, scan.cache.valid)
    assert int(loop.cache.end) == int(scan.cache.end) == PAD_LEN + N_NEW
    # a stream's next call continues the per-layer cache; a prefill after it (the next turn) stacks it
    again, tok_again, _ = decode(tsw, loop, 2, scan_layers=False)
    scan2, tok_scan2, _ = decode(tsw, scan, 2, scan_layers=True)
    np.testing.assert_array_equal(tok_again, tok_scan2)
    nxt = prompt[:, :2]  # fills the cache: 32 + 12 + 2 + 2 slots
    turn = prefill(tsw, nxt, _arange(b, 2) + PAD_LEN + N_NEW + 2, jnp.ones((b, 2), bool), again.cache, again.memory)
    turn_scan = prefill(tsw, nxt, _arange(b, 2) + PAD_LEN + N_NEW + 2, jnp.ones((b, 2), bool), scan2.cache, scan2.memory)
    assert not turn.cache.per_layer
    _close(turn.logits, turn_scan.logits, 1e-5)
    assert gen_module.layer_buffers(tsw) is gen_module.layer_buffers(tsw)  # built once per model
    with pytest.raises(ValueError, match="per-layer KV cache"):
        tsw(prompt[:, :1], _arange(b, 1), jnp.ones((b, 1), bool), fresh().cache.unstack())


def test_decode_buffers_fold_the_memory_projections_into_the_attention(tsw, plain):
    """In decode's per-layer buffers (float32 weights) δ-mem's `in_proj` sits beside q/k/v in
    one matmul and `scale · W_Δo` under `o_proj` (their equality with the scan is the test
    above); with no memory (the no-memory control) the folded attention is the frozen one."""
    cfg, c = tsw.cfg, memory_of(tsw).config
    buffers = gen_module.layer_buffers(tsw)
    attn = nnx.merge(buffers.graphdef, buffers.states[0]).attn
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    assert attn.fused
    assert attn.base.qkv_proj.shape == (cfg.hidden_size, qkv + memory_of(tsw).in_proj.shape[-1])
    assert attn.base.o_proj.shape == (cfg.num_heads * cfg.head_dim + c.width, cfg.hidden_size)
    b = 2
    prompt = jnp.asarray(np.random.default_rng(5).integers(1, cfg.vocab_size, (b, PAD_LEN)).astype(np.int32))
    runs = {}
    for name, model in (("tsw", tsw), ("plain", plain)):
        st = prefill(model, prompt, _arange(b, PAD_LEN), jnp.ones((b, PAD_LEN), bool), KVCache.create(cfg, b, CACHE_LEN), None)
        runs[name] = decode(model, st, N_NEW, scan_layers=False)
    (st_m, tok_m, _), (st_p, tok_p, _) = runs["tsw"], runs["plain"]
    np.testing.assert_array_equal(tok_m, tok_p)
    _close(st_m.logits, st_p.logits, 1e-5)
    assert st_m.memory is None


@pytest.mark.parametrize("scan_layers", [True, False])
def test_shared_prefix_equals_the_prefix_copied_into_every_row(tsw, scan_layers):
    """Questions that continue one prefilled document (a `SharedPrefix`, one copy) get the
    same prompt logits, decoded tokens and memory as with the document's cache copied into
    every row (what the LoCoMo runner did before), through the scan and the per-layer loop."""
    b, V, doc_len, q_len = 3, tsw.cfg.vocab_size, 40, 16
    rng = np.random.default_rng(11)
    doc = jnp.asarray(rng.integers(1, V, (1, doc_len)).astype(np.int32))
    doc_valid = jnp.asarray(np.arange(doc_len) >= 3)[None]  # a left-padded document
    doc_pos = jnp.maximum(jnp.cumsum(doc_valid, axis=1) - 1, 0).astype(jnp.int32)
    room = q_len + N_NEW
    one = prefill(tsw, doc, doc_pos, doc_valid, KVCache.create(tsw.cfg, 1, doc_len + room), _zeros(tsw, 1))
    qs = [list(rng.integers(1, V, n)) for n in (16, 9, 12)]
    tokens, positions, valid = left_pad(qs, q_len)
    positions = positions + one.positions[0]
    memory = MemoryState(S=jnp.repeat(one.memory.S, b, axis=1))

    c = one.cache  # the reference: the whole document cache copied into each row
    tiled = KVCache(k=jnp.repeat(c.k, b, axis=1), v=jnp.repeat(c.v, b, axis=1), valid=jnp.repeat(c.valid, b, axis=0), end=c.end)
    shared = KVCache.create(tsw.cfg, b, room, prefix=SharedPrefix.of(c))
    assert shared.prefix.length == doc_len and shared.k.shape[4] == room
    runs = {}
    for name, cache in (("tiled", tiled), ("shared", shared)):
        st = prefill(tsw, tokens, positions, valid, cache, memory, WriteControl())
        prompt_logits = np.asarray(st.logits)  # decode donates the state
        st, toks, _ = decode(tsw, st, N_NEW, scan_layers=scan_layers)
        runs[name] = (prompt_logits, st, toks)
    (lt, st_t, tok_t), (ls, st_s, tok_s) = runs["tiled"], runs["shared"]
    _close(ls, lt, 1e-5, "prompt logits")
    np.testing.assert_array_equal(tok_s, tok_t)
    _close(st_s.logits, st_t.logits, 1e-5)
    _close(st_s.memory.S, st_t.memory.S, 1e-6)
    assert st_s.cache.prefix is shared.prefix and st_s.cache.stack().k.shape[4] == room  # the rows hold only their own slots
    assert not shared.prefix.k.is_deleted()  # not donated: the next batch of questions reuses it
    with pytest.raises(ValueError, match="one-row cache"):
        SharedPrefix.of(tiled)


# ---------------------------------------------------------------------------- (b) padding


def test_padding_changes_nothing(tsw, prompts, canonical):
    """Each left-padded row of the batch = that prompt alone, unpadded, from a zero memory."""
    replies, S = canonical
    cfg, config = tsw.cfg, memory_of(tsw).config
    chex.assert_shape(S, (cfg.num_layers, 2, config.num_state_heads, config.rank, config.rank))
    assert [len(p) for p in prompts] == [20, 14] and bucket(20) == PAD_LEN  # 12 and 18 pads
    assert [len(r) for r in replies] == [N_NEW, N_NEW]
    for i, p in enumerate(prompts):
        ref_logits, ref_S = _reference(tsw, [p + replies[i]])
        np.testing.assert_array_equal(replies[i], ref_logits[0, len(p) - 1 : -1].argmax(-1), err_msg=f"row {i}")
        _close(S[:, i], ref_S[:, 0], STATE_TOL, f"memory of row {i}")


def test_rows_are_independent(tsw, prompts, canonical):
    """Swapping the rows of a batch swaps the replies and the memories (same shapes, no compile)."""
    replies, S = canonical
    swapped, mem = generate(tsw, prompts[::-1], N_NEW)
    assert swapped == replies[::-1]
    _close(np.asarray(mem.S)[:, ::-1], S, 1e-6)


# ---------------------------------------------------------------------------- stop tokens


def test_stop_token_ends_row_and_its_writes(tsw, prompts, canonical):
    replies, S = canonical
    stop = replies[0][STOP_AT]
    # the fixture data: row 0 first emits `stop` at STOP_AT, row 1 never does
    assert stop not in replies[0][:STOP_AT] and stop not in replies[1]

    stopped, mem = generate(tsw, prompts, N_NEW, stop_ids=[stop])
    assert stopped[0] == replies[0][: STOP_AT + 1]  # the stop token is part of the reply
    assert stopped[1] == replies[1]
    S2 = np.asarray(mem.S)
    _close(S2[:, 1], S[:, 1], 1e-6, "the other row is unaffected")
    # row 0's memory = a run that ends with the stop token (which was written), nothing after
    _, ref_S = _reference(tsw, [prompts[0] + replies[0][: STOP_AT + 1]])
    _close(S2[:, 0], ref_S[:, 0], STATE_TOL, "memory of the stopped row")
    assert np.abs(S2[:, 0] - S[:, 0]).max() > 1e-3  # (the later tokens would have written)

    # the same through decode: `live`, padding tokens, `done` and positions
    state, tokens, live = decode(tsw, _canonical_state(tsw, prompts), N_NEW, stop_ids=[stop])
    chex.assert_shape([tokens, live], (2, N_NEW))
    np.testing.assert_array_equal(live[0], np.arange(N_NEW) <= STOP_AT)
    assert bool(jnp.all(live[1]))
    np.testing.assert_array_equal(tokens[0, : STOP_AT + 1], replies[0][: STOP_AT + 1])
    np.testing.assert_array_equal(tokens[0, STOP_AT + 1 :], 0)
    np.testing.assert_array_equal(state.done, [True, False])
    np.testing.assert_array_equal(state.positions, [20 + STOP_AT + 1, 14 + N_NEW])
    _close(state.memory.S, S2, 1e-6)


def test_stream_yields_chunks_and_stops_early(tsw, prompts, canonical, decode_traces):
    replies, _ = canonical
    chunks = list(stream(tsw, _canonical_state(tsw, prompts), 16, chunk=8))
    assert len(chunks) == 2
    chex.assert_shape(chunks, (2, 8))
    out = np.concatenate(chunks, axis=1)
    np.testing.assert_array_equal(out[:, :N_NEW], replies)

    # one stop id that ends both rows within the first chunk (one id, as above: the
    # number of stop ids is part of the compiled shape)
    common = sorted(set(replies[0][:8]) & set(replies[1][:8]))
    assert common, "fixture data: the rows share no token in their first 8"
    ends = [_first_stop(r, common[:1]) for r in replies]
    final = []
    chunks = list(stream(tsw, _canonical_state(tsw, prompts), 16, stop_ids=common[:1], chunk=8, on_state=final.append))
    assert len(chunks) == 1  # the second chunk was never run
    chex.assert_shape(chunks[0], (2, 8))
    for row, end, reply in zip(chunks[0], ends, replies):
        np.testing.assert_array_equal(row[: end + 1], reply[: end + 1])
        np.testing.assert_array_equal(row[end + 1 :], -1)  # −1 after a stop
    assert len(final) == 1 and bool(jnp.all(final[0].done))
    assert decode_traces.count(8) == 1  # 3 chunks, with and without stop ids: one program


# ---------------------------------------------------------------------------- (c) memory off


def test_memory_none_equals_backbone(tsw, plain, prompts):
    tokens, positions, valid = left_pad(prompts, PAD_LEN)
    cache = KVCache.create(tsw.cfg, 2, PAD_LEN)
    want, want_cache, none = forward(plain, tokens, positions, valid, cache, None, attend_cache=False)
    got, got_cache, mem = forward(tsw, tokens, positions, valid, cache, None, attend_cache=False)
    assert none is None and mem is None
    chex.assert_shape([want, got], (2, PAD_LEN, tsw.cfg.vocab_size))
    _close(got, want, 1e-6)
    _close(got_cache.k, want_cache.k, 1e-6)
    _close(got_cache.v, want_cache.v, 1e-6)


def test_zero_init_equals_backbone(plain, prompts):
    """output_init="zero": corrections are exactly zero, whatever the memory holds."""
    zero, _ = models.load_pretrained(FIXTURES / "tsw" / "backbone")
    attach(zero, DeltaMemConfig(output_init="zero"))
    config = memory_of(zero).config
    shape = (zero.cfg.num_layers, 2, config.num_state_heads, config.rank, config.rank)
    memory = MemoryState(S=jax.random.normal(jax.random.PRNGKey(1), shape, jnp.float32))

    z = _canonical_state(zero, prompts, memory)
    p = _canonical_state(plain, prompts, None)
    assert p.memory is None
    chex.assert_shape(z.memory.S, shape)
    assert np.abs(np.asarray(z.memory.S) - np.asarray(memory.S)).max() > 1e-3  # it wrote
    _close(z.logits, p.logits, 1e-6)
    z, z_tokens, _ = decode(zero, z, N_NEW)
    p, p_tokens, _ = decode(plain, p, N_NEW)
    np.testing.assert_array_equal(z_tokens, p_tokens)
    _close(z.logits, p.logits, 1e-6)

    z_replies, z_mem = generate(zero, prompts, N_NEW)
    p_replies, p_mem = generate(plain, prompts, N_NEW)
    assert z_replies == p_replies
    assert p_mem is None
    chex.assert_shape(z_mem.S, shape)


# ---------------------------------------------------------------------------- (d) compilation


def test_decode_traced_once_for_same_shapes(tsw, prompts, canonical, decode_traces):
    """Same bucket, other prompts, other max_new_tokens (same chunk): no new trace.

    (The 8-step program is shared with the stream test: traced once in the module.)
    """
    replies, _ = canonical
    chunks = list(stream(tsw, _canonical_state(tsw, prompts), 16, chunk=8))  # 2 chunks of 8
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1)[:, :N_NEW], replies)
    rng = np.random.default_rng(5)
    others = [rng.integers(1, 256, 25).tolist(), rng.integers(1, 256, 30).tolist()]
    out, _ = generate(tsw, others, 16, chunk=8)
    assert [len(r) for r in out] == [16, 16]
    out, _ = generate(tsw, prompts, 8, chunk=8)  # bucket(8) == bucket(16): same cache
    assert out == [r[:8] for r in replies]
    assert decode_traces.count(8) == 1


def test_forty_tokens_trace_once(tsw, prompts, canonical, decode_traces):
    replies, _ = canonical
    out, _ = generate(tsw, prompts, 40)
    assert decode_traces.count(40) == 1  # one scan of 40 steps, not 40 traces
    assert [len(r) for r in out] == [40, 40]
    assert [r[:N_NEW] for r in out] == replies
    rng = np.random.default_rng(6)
    generate(tsw, [rng.integers(1, 256, 17).tolist(), rng.integers(1, 256, 32).tolist()], 40)
    assert decode_traces.count(40) == 1


# ---------------------------------------------------------------------------- sampling


def test_sampling_settings_validated():
    for bad in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError, match="invalid sampling"):
            Sampling(**bad)


@pytest.fixture(scope="module")
def logits():
    return jax.random.normal(jax.random.PRNGKey(0), (64, 256), jnp.float32) * 3.0


def test_greedy_is_argmax(logits):
    tok = sample(logits, jax.random.PRNGKey(1), Sampling())
    chex.assert_shape(tok, (64,))
    chex.assert_type(tok, jnp.int32)
    np.testing.assert_array_equal(tok, jnp.argmax(logits, -1))
    # argmax's rules where rows are not plain: ties (the first), NaN (the first NaN), all -inf (0)
    odd = np.asarray(logits[:4]).copy()
    odd[0, [3, 7]] = odd[0].max() + 1.0
    odd[1, [5, 9]] = np.nan
    odd[2] = -np.inf
    odd[3, 200:] = np.inf
    odd = jnp.asarray(odd)
    np.testing.assert_array_equal(jax.jit(greedy)(odd), jnp.argmax(odd, -1))
    np.testing.assert_array_equal(jnp.argmax(odd, -1), [3, 5, 0, 200])


@pytest.mark.parametrize("temperature", [0.1, 1.0, 10.0])
def test_top_k_1_and_tiny_top_p_are_greedy(logits, temperature):
    greedy = np.asarray(jnp.argmax(logits, -1))
    for seed in range(3):
        key = jax.random.PRNGKey(seed)
        np.testing.assert_array_equal(sample(logits, key, Sampling(temperature, top_k=1)), greedy)
        np.testing.assert_array_equal(sample(logits, key, Sampling(temperature, top_p=1e-6)), greedy)


def test_top_k_samples_within_top_k(logits):
    top5 = np.asarray(jax.lax.top_k(logits, 5)[1])  # [64, 5]
    draws = np.stack([np.asarray(sample(logits, jax.random.PRNGKey(s), Sampling(5.0, top_k=5))) for s in range(20)])
    assert all(np.isin(draws[:, i], top5[i]).all() for i in range(logits.shape[0]))
    assert (draws != top5[:, 0]).any()  # (not greedy in disguise)


def test_top_p_keeps_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]] * 256, jnp.float32))
    tok = np.asarray(sample(logits, jax.random.PRNGKey(0), Sampling(1.0, top_p=0.7)))
    assert set(tok.tolist()) == {1, 3}  # 0.5 + 0.3 reaches 0.7; 0.15 and 0.05 are cut


def test_same_seed_same_tokens(tsw, prompts):
    s = Sampling(temperature=1.5, top_k=5)
    n = 40  # the prefill shapes of the forty-token test
    a, mem_a = generate(tsw, prompts, n, sampling=s, seed=7)
    b, mem_b = generate(tsw, prompts, n, sampling=s, seed=7)
    c, _ = generate(tsw, prompts, n, sampling=s, seed=8)
    assert a == b and a != c
    _close(mem_a.S, mem_b.S, 0.0)


# ---------------------------------------------------------------------------- shapes and errors


def test_bucket():
    assert [bucket(n) for n in (1, 15, 16, 17, 32, 33, 200, 256, 257, 512, 513)] == [
        16, 16, 16, 32, 32, 64, 256, 256, 512, 512, 768,
    ]


def test_left_pad():
    tokens, positions, valid = left_pad([[5, 6, 7], [8], []], 4, pad_id=9)
    chex.assert_shape([tokens, positions, valid], (3, 4))
    chex.assert_type([tokens, positions], jnp.int32)
    np.testing.assert_array_equal(tokens, [[9, 5, 6, 7], [9, 9, 9, 8], [9, 9, 9, 9]])
    np.testing.assert_array_equal(valid, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(positions, [[0, 0, 1, 2], [0, 0, 0, 0], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match="prompt 1 has 5 tokens, more than 4"):
        left_pad([[1], [1, 2, 3, 4, 5]], 4)


def test_prefill_and_decode_refuse_what_does_not_fit(tsw, prompts):
    tokens, positions, valid = left_pad(prompts, PAD_LEN)
    with pytest.raises(ValueError, match=r"prompt of 32 \(padded\) tokens does not fit: the cache has 16 of 16"):
        prefill(tsw, tokens, positions, valid, KVCache.create(tsw.cfg, 2, 16), _zeros(tsw, 2))
    state = _canonical_state(tsw, prompts)  # 16 slots left
    with pytest.raises(ValueError, match="17 decode steps do not fit: 16 cache slots left"):
        decode(tsw, state, 17)
    with pytest.raises(ValueError, match="does not fit: the cache has 16 of 48"):
        prefill(tsw, tokens, positions, valid, state.cache, state.memory)  # a second turn too long


def test_generate_zero_new_tokens_writes_the_prompt_only(tsw, prompts):
    replies, mem = generate(tsw, prompts, 0)  # bucket(0) == 16: the canonical prefill
    assert replies == [[], []]
    state = _canonical_state(tsw, prompts)
    _close(mem.S, state.memory.S, 0.0)


def test_decode_buffers_head_of_a_tied_embedding():
    """Decode's buffers hold a tied embedding transposed as the LM head: decoding over
    them equals decoding over the stacked layers with the embedding as the head."""
    cfg = ModelConfig(
        family="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
        max_position_embeddings=128,
    )  # fmt: skip
    model = models.Decoder(cfg, nnx.Rngs(0))
    head = gen_module.layer_buffers(model).head
    chex.assert_shape(head, (cfg.hidden_size, cfg.vocab_size))
    np.testing.assert_array_equal(head, model.embed[...].T)
    b, t = 2, 9
    prompt = jnp.asarray(np.random.default_rng(3).integers(1, cfg.vocab_size, (b, t)).astype(np.int32))

    def fresh():
        return prefill(model, prompt, _arange(b, t), jnp.ones((b, t), bool), KVCache.create(cfg, b, t + N_NEW), None)

    scan, tok_scan, _ = decode(model, fresh(), N_NEW, scan_layers=True)
    loop, tok_loop, _ = decode(model, fresh(), N_NEW, scan_layers=False)
    np.testing.assert_array_equal(tok_loop, tok_scan)
    _close(loop.logits, scan.logits, 1e-5)


def test_resized_cache_keeps_its_slots_and_decodes_the_same(tsw):
    """`KVCache.resized` adds empty slots or drops unused ones (stacked or per layer):
    the tokens in use, and what decodes after them, stay the same."""
    b, V = 2, tsw.cfg.vocab_size
    prompt = jnp.asarray(np.random.default_rng(13).integers(1, V, (b, PAD_LEN)).astype(np.int32))
    st = prefill(tsw, prompt, _arange(b, PAD_LEN), jnp.ones((b, PAD_LEN), bool), KVCache.create(tsw.cfg, b, CACHE_LEN), _zeros(tsw, b))
    copy = functools.partial(jax.tree.map, jnp.copy)  # decode donates its state
    ref, tok_ref, _ = decode(tsw, copy(st), N_NEW, scan_layers=False)
    for slots in (PAD_LEN + N_NEW, 3 * CACHE_LEN):
        cache = copy(st.cache).resized(slots)
        assert cache.max_len == slots and int(cache.end) == PAD_LEN
        chex.assert_shape((cache.k, cache.v), (st.cache.k.shape[:-1] + (slots,), st.cache.v.shape[:-2] + (slots, st.cache.v.shape[-1])))
        keep = min(slots, CACHE_LEN)
        np.testing.assert_array_equal(cache.k[..., :keep], st.cache.k[..., :keep])
        np.testing.assert_array_equal(cache.v[..., :keep, :], st.cache.v[..., :keep, :])
        np.testing.assert_array_equal(cache.valid[:, :keep], st.cache.valid[:, :keep])
        assert not cache.valid[:, keep:].any()
        out, tok, _ = decode(tsw, copy(st).replace(cache=cache), N_NEW, scan_layers=False)
        np.testing.assert_array_equal(tok, tok_ref)
        _close(out.logits, ref.logits, 1e-5)
        _close(out.memory.S, ref.memory.S, 1e-6)
    per_layer = ref.cache.resized(2 * CACHE_LEN)  # a CPU decode leaves it per layer
    assert per_layer.per_layer and per_layer.max_len == 2 * CACHE_LEN
    np.testing.assert_array_equal(per_layer.stack().k[..., :CACHE_LEN], ref.cache.stack().k)
    with pytest.raises(ValueError, match="cannot hold"):
        st.cache.resized(PAD_LEN - 1)
