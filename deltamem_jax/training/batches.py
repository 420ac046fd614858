"""Episodes → fixed-shape token arrays, rendered exactly as `Session` renders them.

`session` protocol: every history turn is a memory-only turn of `Session.remember`
(`memory_only_turn(..., generation_prompt=False)`: the system segment, read, then the
turn, written), and the question is a memory-only turn of `Session.ask` (system prompt +
question with the generation prompt, read only) followed by the answer and the stop
token, the targets of the loss.

`official` protocol (spec §5): the whole history rendered as one chat (system + user
turns) is written in one pass; the read pass is the same as above.

With `context=True` a batch also carries each episode as a context+memory conversation
runs it (the evaluation's `context_memory` condition): system + history turns + question
as one chat, then the answer and the stop token, all in the context and written into a
fresh memory token by token; its answer positions are `context_index`.

All shapes are fixed by a `Layout`, so one compilation serves a whole run; padding
(left, as in `decoding.left_pad`) neither attends nor writes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from flax import struct

from deltamem_jax.decoding import bucket, left_pad
from deltamem_jax.session import DEFAULT_SYSTEM, memory_only_turn
from deltamem_jax.training.data import Episode
from models.tokenizer import Tokenizer

PROTOCOLS = ("session", "official")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Padded lengths of every part of a batch."""

    max_turns: int = 9  # history turns (session protocol)
    turn_len: int = 32  # tokens of one history turn (without the system segment)
    history_len: int = 512  # tokens of the whole rendered history (official protocol)
    read_len: int = 64  # system + question + answer + stop token
    answer_len: int = 16  # answer tokens + stop token (the positions that get logits)
    context_len: int = 256  # system + history + question + answer + stop, in one context (context=True)


@struct.dataclass
class Segment:
    """Left-padded tokens of a batch of segments; positions start where `offset` says."""

    tokens: np.ndarray  # [..., t] int32
    positions: np.ndarray  # [..., t] int32
    valid: np.ndarray  # [..., t] bool


@struct.dataclass
class Batch:
    system: Segment  # [b, s]: the system segment each memory-only turn starts with
    turns: Segment | None  # [b, T, t] (session) — a turn of padding writes nothing
    history: Segment | None  # [b, h] (official)
    read: Segment  # [b, r]: system + question + answer + stop
    target_index: np.ndarray  # [b, a] int32: read positions whose next token is a target
    targets: np.ndarray  # [b, a] int32
    target_mask: np.ndarray  # [b, a] bool
    value_mask: np.ndarray  # [b, a] bool: targets that spell the told value (the recalled content)
    plain: Segment | None = None  # [b, p]: a chat transcript for the KL term (`plain.transcripts`), or none
    context: Segment | None = None  # [b, c]: the whole episode in one context, written as read (context=True)
    context_index: np.ndarray | None = None  # [b, a] int32: context positions whose next token is a target

    def tokens(self) -> int:
        """Real (unpadded) tokens the step processes: every turn re-reads the system segment."""
        if self.turns is not None:
            turns = int(self.turns.valid.any(-1).sum())
            written = int(self.turns.valid.sum()) + turns * int(self.system.valid[0].sum())
        else:
            written = int(self.history.valid.sum())
        extra = sum(int(x.valid.sum()) for x in (self.plain, self.context) if x is not None)
        return written + int(self.read.valid.sum()) + extra


def _segment(ids: Sequence[Sequence[int]], length: int, offset: np.ndarray | int = 0, what: str = "segment") -> Segment:
    for i, p in enumerate(ids):
        if len(p) > length:
            raise ValueError(f"{what} {i} has {len(p)} tokens, more than its padded length {length}; raise the Layout")
    tokens, positions, valid = (np.asarray(a) for a in left_pad(ids, length))
    return Segment(tokens, positions + np.asarray(offset, np.int32)[..., None], valid)


class Renderer:
    """Turns episodes into `Batch`es for one tokenizer, system prompt and layout."""

    def __init__(self, tokenizer: Tokenizer, layout: Layout = Layout(), system_prompt: str = DEFAULT_SYSTEM):
        self.tokenizer, self.layout, self.system_prompt = tokenizer, layout, system_prompt
        self.system_ids, _ = memory_only_turn(tokenizer, system_prompt, {"role": "user", "content": ""}, False)
        self.system_len = bucket(len(self.system_ids))  # as `Session` pads it
        self.stop_id = tokenizer.eos_ids[0] if tokenizer.eos_ids else tokenizer.eos_id

    def turn_ids(self, text: str) -> list[int]:
        """A history turn as `Session.remember` writes it."""
        return memory_only_turn(self.tokenizer, self.system_prompt, {"role": "user", "content": text}, False)[1]

    def question_ids(self, text: str) -> list[int]:
        """A question as `Session.ask` reads it (after the system segment)."""
        return memory_only_turn(self.tokenizer, self.system_prompt, {"role": "user", "content": text}, True)[1]

    def value_span(self, answer: str, value: str, answer_ids: list[int]) -> tuple[int, int]:
        """[start, end) of the answer tokens that spell `value`; (0, 0) when there is none.

        The span is found by encoding the answer up to the value and up to its end; if
        BPE merges across either boundary (the prefixes do not match), the whole answer
        counts as the value rather than guessing."""
        at = answer.rfind(value) if value else -1
        if at < 0:
            return 0, 0
        start_ids = self.tokenizer.encode(answer[:at].rstrip())
        end_ids = self.tokenizer.encode(answer[: at + len(value)])
        n, m = len(start_ids), len(end_ids)
        if answer_ids[:n] != start_ids or answer_ids[:m] != end_ids or m <= n:
            return 0, len(answer_ids)
        return n, m

    def history_ids(self, ep: Episode) -> list[int]:
        messages = [{"role": "system", "content": self.system_prompt}] + [{"role": "user", "content": t} for t in ep.turns]
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, add_generation_prompt=False))

    def context_ids(self, ep: Episode) -> list[int]:
        """System + history + question as one chat, as the `context_memory` evaluation reads it."""
        messages = [{"role": "system", "content": self.system_prompt}] + [{"role": "user", "content": t} for t in (*ep.turns, ep.question)]
        return self.tokenizer.encode_chat(messages)

    def batch(self, eps: Sequence[Episode], protocol: str = "session", context: bool = False) -> Batch:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        L, b = self.layout, len(eps)
        system = _segment([self.system_ids] * b, self.system_len, what="system prompt")
        turns = history = None
        if protocol == "session":
            if max(len(e.turns) for e in eps) > L.max_turns:
                raise ValueError(f"an episode has more than {L.max_turns} turns; raise Layout.max_turns")
            ids = [[self.turn_ids(t) for t in e.turns] + [[]] * (L.max_turns - len(e.turns)) for e in eps]
            flat = _segment([t for row in ids for t in row], L.turn_len, len(self.system_ids), what="history turn")
            turns = Segment(*(a.reshape(b, L.max_turns, L.turn_len) for a in (flat.tokens, flat.positions, flat.valid)))
        else:
            history = _segment([self.history_ids(e) for e in eps], L.history_len, what="history")
        reads, index, targets = [], np.zeros((b, L.answer_len), np.int32), np.zeros((b, L.answer_len), np.int32)
        mask, value_mask = np.zeros((b, L.answer_len), bool), np.zeros((b, L.answer_len), bool)
        contexts, context_index = [], np.zeros((b, L.answer_len), np.int32)
        for i, e in enumerate(eps):
            prompt = self.system_ids + self.question_ids(e.question)
            answer = self.tokenizer.encode(e.answer)
            value_mask[i, slice(*self.value_span(e.answer, e.value, answer))] = True
            answer = answer + [self.stop_id]
            if len(answer) > L.answer_len:
                raise ValueError(f"answer of {len(answer)} tokens (stop included) exceeds Layout.answer_len={L.answer_len}")
            reads.append(prompt + answer)
            index[i, : len(answer)] = _answer_positions(L.read_len, len(prompt), len(answer))
            targets[i, : len(answer)] = answer
            mask[i, : len(answer)] = True
            if context:
                prompt = self.context_ids(e)
                contexts.append(prompt + answer)
                context_index[i, : len(answer)] = _answer_positions(L.context_len, len(prompt), len(answer))
        read = _segment(reads, L.read_len, what="question and answer")
        batch = Batch(system, turns, history, read, index, targets, mask, value_mask)
        if context:
            batch = batch.replace(context=_segment(contexts, L.context_len, what="episode in context"), context_index=context_index)
        return batch


def _answer_positions(length: int, prompt: int, answer: int) -> np.ndarray:
    """Positions (in a left-padded sequence of `length`) whose next token is an answer token."""
    start = length - (prompt + answer) + prompt - 1  # the position predicting answer[0]
    return np.arange(start, start + answer)


__all__ = ["Batch", "Layout", "PROTOCOLS", "Renderer", "Segment"]
