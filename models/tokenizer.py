"""Text <-> token ids and chat prompts: a ``transformers`` tokenizer plus the ids that stop generation."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .config import import_transformers
from .gguf import GGUFCheckpoint, read_gguf

__all__ = ["Tokenizer"]

# Tokens that end a turn or a document in common chat formats; each one present in the
# vocabulary as a special token also stops generation (as llama.cpp's end-of-generation set does).
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A ``transformers`` tokenizer (``.tokenizer``: encoding, special tokens, chat template) and
    ``eos_ids``, every id that should stop generation: the tokenizer's eos, the given ids (a
    ``generation_config.json``'s), then the end-of-turn special tokens it has."""

    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    eos_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        tok = self.tokenizer
        ids = [tok.eos_token_id, *self.eos_ids]
        special = {t.content for t in tok.added_tokens_decoder.values() if t.special}
        ids += [tok.convert_tokens_to_ids(t) for t in _END_OF_TURN_TOKENS if t in special]
        object.__setattr__(self, "eos_ids", tuple(dict.fromkeys(int(i) for i in ids if i is not None)))

    @classmethod
    def from_gguf(cls, source: GGUFCheckpoint | str | pathlib.Path | None = None) -> Tokenizer:
        """From a :class:`GGUFCheckpoint` or a GGUF path (default: the embedded SmolLM2 file).

        Not ``AutoTokenizer.from_pretrained(..., gguf_file=...)``: in transformers 5.x that route
        imports torch (its GGUF reader), and its conversion drops the digit split of llama.cpp's
        "smollm" pre-tokenizer (SmolLM's ``Digits(individual_digits=True)``), so "a  1" gets other
        ids than SmolLM2's own tokenizer. The vocabulary is rebuilt by ``models.gguf`` instead and
        wrapped here; chat templates and special tokens are transformers'.
        """
        ckpt = source if isinstance(source, GGUFCheckpoint) else read_gguf(source, load_tensors=False)
        s = ckpt.special_tokens
        ids = {"bos_token": s.bos_id, "eos_token": s.eos_id, "pad_token": s.pad_id, "unk_token": s.unk_id}
        tokens = {k: ckpt.tokenizer.id_to_token(i) for k, i in ids.items() if i is not None}
        fast = import_transformers().PreTrainedTokenizerFast
        return cls(fast(tokenizer_object=ckpt.tokenizer, chat_template=ckpt.chat_template, **tokens))

    @classmethod
    def from_pretrained(cls, folder: str | pathlib.Path) -> Tokenizer:
        """From a Hugging Face folder, through ``transformers.AutoTokenizer`` (``tokenizer.json`` or a
        SentencePiece ``tokenizer.model``; the chat template from ``chat_template.jinja`` or
        ``tokenizer_config.json``). ``generation_config.json``'s eos ids also stop generation."""
        folder = pathlib.Path(folder)
        if not folder.is_dir():  # a missing folder would otherwise be looked up on the Hub
            raise FileNotFoundError(f"no tokenizer folder at {folder}")
        generation = folder / "generation_config.json"
        eos = json.loads(generation.read_text(encoding="utf-8")).get("eos_token_id") if generation.is_file() else None
        eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
        return cls(import_transformers().AutoTokenizer.from_pretrained(str(folder)), tuple(eos))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return len(self.tokenizer)

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def eos_id(self) -> int | None:
        """The first stop id."""
        return self.eos_ids[0] if self.eos_ids else None

    @property
    def pad_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    @property
    def bos_token(self) -> str | None:
        return self.tokenizer.bos_token

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.tokenizer.convert_ids_to_tokens(self.eos_id)

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer.chat_template

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (``<|im_start|>``) map to
        their single ids; ``add_special_tokens`` adds the model's own bos/eos, if it has any."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (special tokens dropped unless ``skip_special_tokens=False``)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **template_vars: Any
    ) -> str:
        """``messages`` (``{"role", "content"}`` dicts) rendered by transformers with the chat
        template; extra keyword arguments become template variables."""
        return self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt, **template_vars
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **template_vars: Any
    ) -> list[int]:
        """Ids of the rendered chat; the template writes its own special tokens, so none are added."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **template_vars))
