"""Text <-> token ids, plus chat-template rendering, for GGUF files and Hugging Face folders."""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tokenizers

from .gguf import GGUFCheckpoint, read_gguf

__all__ = ["Tokenizer"]

# Tokens that end a turn or a document in common chat formats; each one present in the
# vocabulary as a special token also stops generation (as llama.cpp's end-of-generation set does).
_END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|end|>",
)


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A ``tokenizers.Tokenizer`` with its chat template and special token ids.

    ``eos_ids`` lists every id that should stop generation (the eos id first).
    """

    tokenizer: tokenizers.Tokenizer
    chat_template: str | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    eos_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_ids", _stop_ids(self.tokenizer, self.eos_id, self.eos_ids))

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, source: GGUFCheckpoint | str | pathlib.Path | None = None) -> Tokenizer:
        """From a :class:`GGUFCheckpoint` or a GGUF path (default: the embedded SmolLM2 file)."""
        ckpt = source if isinstance(source, GGUFCheckpoint) else read_gguf(source, load_tensors=False)
        special = ckpt.special_tokens
        return cls(
            tokenizer=ckpt.tokenizer,
            chat_template=ckpt.chat_template,
            bos_id=special.bos_id,
            eos_id=special.eos_id,
            pad_id=special.pad_id,
        )

    @classmethod
    def from_pretrained(cls, folder: str | pathlib.Path) -> Tokenizer:
        """From a Hugging Face folder: ``tokenizer.json`` (required), ``tokenizer_config.json``,
        ``chat_template.jinja`` and ``generation_config.json`` (optional)."""
        folder = pathlib.Path(folder)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file} is missing (needed to build the tokenizer)")
        tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        config = _read_json(folder / "tokenizer_config.json")
        generation = _read_json(folder / "generation_config.json")

        template_file = folder / "chat_template.jinja"
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
        if template is None:
            template = _pick_template(config.get("chat_template"))

        def token_id(key: str) -> int | None:
            value = config.get(key)
            if isinstance(value, Mapping):
                value = value.get("content")
            return tok.token_to_id(value) if isinstance(value, str) else None

        gen_eos = generation.get("eos_token_id")
        gen_eos_ids = tuple(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        eos_id = token_id("eos_token")
        if eos_id is None and gen_eos_ids:
            eos_id = gen_eos_ids[0]
        bos_id = token_id("bos_token")
        if bos_id is None:
            bos_id = generation.get("bos_token_id")
        pad_id = token_id("pad_token")
        if pad_id is None:
            pad_id = generation.get("pad_token_id")
        return cls(
            tokenizer=tok,
            chat_template=template,
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=pad_id,
            eos_ids=gen_eos_ids,
        )

    # -- properties ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.tokenizer.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.tokenizer.id_to_token(self.eos_id)

    # -- encoding -----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (``<|im_start|>``) map to
        their single ids; ``add_special_tokens`` adds the model's own bos/eos, if it has any."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (special tokens dropped unless ``skip_special_tokens=False``)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **template_vars: Any,
    ) -> str:
        """Render ``messages`` (``{"role", "content"}`` dicts) with the Jinja chat template, the
        way ``transformers`` does. Extra keyword arguments become template variables."""
        if not self.chat_template:
            raise ValueError(
                "this tokenizer has no chat template (no tokenizer.chat_template in the GGUF, or "
                "no chat_template in tokenizer_config.json / chat_template.jinja)"
            )
        variables = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": "" if self.pad_id is None else self.tokenizer.id_to_token(self.pad_id),
            **template_vars,
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
        }
        return _compile(self.chat_template).render(**variables)

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **template_vars: Any
    ) -> list[int]:
        """Ids of the rendered chat; the template writes its own special tokens, so none are added."""
        text = self.apply_chat_template(messages, add_generation_prompt, **template_vars)
        return self.encode(text, add_special_tokens=False)


def _stop_ids(tok: tokenizers.Tokenizer, eos_id: int | None, extra: Iterable[int]) -> tuple[int, ...]:
    ids = [] if eos_id is None else [int(eos_id)]
    ids += [int(i) for i in extra]
    special = {token.content for token in tok.get_added_tokens_decoder().values() if token.special}
    ids += [tok.token_to_id(t) for t in _END_OF_TURN_TOKENS if t in special]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _pick_template(value: Any) -> str | None:
    """``tokenizer_config.json``'s ``chat_template``: a string or a list of ``{name, template}``."""
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, Mapping)}
        return named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) else None


_TEMPLATES: dict[str, Any] = {}


def _compile(source: str) -> Any:
    """Compile a chat template with the sandboxed environment ``transformers`` uses."""
    if source not in _TEMPLATES:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template error: {message}")

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def strftime_now(fmt: str) -> str:
            return datetime.datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]
