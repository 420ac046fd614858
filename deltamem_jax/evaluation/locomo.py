"""LoCoMo question answering in four protocols (plus the no-history control).

Protocols (`PROTOCOLS`), all on one model with δ-mem attached:
  frozen         the conversation truncated from the front to fit the context window, then
                 the question (the official LoCoMo prompt); memory off: the frozen backbone
  official       the same prompt, also written into the memory while it is read (δ-mem's
                 own evaluation protocol)
  memory_only    the whole conversation written into the memory session by session, as
                 `Session.remember` writes it; the question asked as `Session.ask` asks it,
                 with no history in the context
  window_memory  the part of the conversation that does not fit the window written into the
                 memory as in memory_only; the rest in the context (written too), then the
                 question: what a user of a long chat wants
  no_history     memory_only's question with no history and no memory (its control)

Each conversation's prefix (context and memory) is built once and every question starts
from that snapshot: a batch of questions attends to one shared copy of the prefix's KV
cache (`SharedPrefix`; each row caches only its own question and reply), starts from a
copy of the prefix's memory, and is prefilled after the prefix and decoded together.

The prompts follow the official LoCoMo evaluation (snap-research/locomo,
task_eval/evaluate_llama2.py): `CONV_START` + per session "DATE: …\\nCONVERSATION:\\n" and
`Speaker said, "text"` lines, then `QA_PROMPT`; temporal questions ask for an approximate
date; adversarial ones offer "(a)/(b)" with "No information available" as one option.
The data is CC BY-NC 4.0 and is only read from the path given.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deltamem_jax.adapter import memory_of
from deltamem_jax.decoding import DecodeState, Sampling, bucket, left_pad, prefill, prompt_length, stream
from deltamem_jax.evaluation.locomo_metric import score
from deltamem_jax.session import DEFAULT_SYSTEM, Session, memory_only_turn, write_control
from deltamem_jax.state import MemoryState, WriteControl, WriteMode
from models.decoder import KVCache, SharedPrefix

DEFAULT_DATA = Path("../shared/data/locomo/locomo10.json")  # relative to the repository root, as the project keeps it
PROTOCOLS = ("frozen", "official", "memory_only", "window_memory", "no_history")

SYSTEM = ("You are a helpful, respectful and honest assistant whose job is to understand the following conversation "
          "and answer questions based on the conversation. If you don't know the answer to a question, please don't "
          "share false information.")  # fmt: skip
CONV_START = ("Below is a conversation between two people: {} and {}. The conversation takes place over multiple days "
              "and the date of each conversation is wriiten at the beginning of the conversation.\n\n")  # fmt: skip (sic)
# The official question prompt. Its head is the same for every question, so the context
# protocols put it in the shared prefix (prefilled once per conversation, not per row).
QA_HEAD = ("\nBased on the above conversations, write a short answer for the following question in a few words. "
           "Do not write complete and lengthy sentences. Answer with exact words from the conversations whenever "
           "possible.\n\nQuestion:")  # fmt: skip
QA_PROMPT = QA_HEAD + " {}\n"
NO_INFO = "No information available"
OFFICIAL_SAMPLING = Sampling(temperature=0.4, top_k=10, top_p=0.9)
MAX_NEW_TOKENS = 50  # the official ANS_TOKENS_PER_QUES


@dataclasses.dataclass(frozen=True)
class QA:
    index: int  # position in the sample's "qa" list
    question: str
    answer: str  # the gold text as in the data (adversarial: its "adversarial_answer")
    category: int


@dataclasses.dataclass(frozen=True)
class Conversation:
    sample_id: str
    speakers: tuple[str, str]
    sessions: tuple[tuple[str, tuple[str, ...]], ...]  # (date, turn lines) per non-empty session
    qa: tuple[QA, ...]


def _turn_line(turn: dict) -> str:
    line = f'{turn["speaker"]} said, "{turn["text"]}"'
    if turn.get("blip_caption"):
        line += f" [shares {turn['blip_caption']}]"
    return line + "\n"


def load_conversations(path: str | Path = DEFAULT_DATA) -> list[Conversation]:
    """LoCoMo samples from `path` (the official locomo10.json schema)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no LoCoMo data at {path}; pass --data PATH to locomo10.json")
    out = []
    for sample in json.loads(path.read_text()):
        conv = sample["conversation"]
        keys = sorted((k for k in conv if re.fullmatch(r"session_\d+", k) and conv[k]), key=lambda k: int(k.split("_")[1]))
        sessions = tuple((str(conv.get(f"{k}_date_time", "")), tuple(_turn_line(t) for t in conv[k])) for k in keys)
        qa = tuple(
            QA(i, q["question"], str(q.get("answer", q.get("adversarial_answer", ""))) if q["category"] != 5
               else str(q.get("adversarial_answer", q.get("answer", ""))), int(q["category"]))
            for i, q in enumerate(sample["qa"])
        )  # fmt: skip
        out.append(Conversation(sample["sample_id"], (conv["speaker_a"], conv["speaker_b"]), sessions, qa))
    return out


def session_text(date: str, lines: Sequence[str]) -> str:
    return f"\nDATE: {date}\nCONVERSATION:\n" + "".join(lines)


def question_text(qa: QA, seed: int = 0) -> tuple[str, dict[str, str] | None]:
    """The official question prompt and, for adversarial questions, the (a)/(b) options."""
    if qa.category == 2:
        return QA_PROMPT.format(qa.question + " Use DATE of CONVERSATION to answer with an approximate date."), None
    if qa.category == 5:
        rng = random.Random(f"{seed}-{qa.index}")
        pair = [NO_INFO, qa.answer] if rng.random() < 0.5 else [qa.answer, NO_INFO]
        q = f"{qa.question} (a) {pair[0]} (b) {pair[1]}. Select the correct answer by writing (a) or (b)."
        return QA_PROMPT.format(q), {"a": pair[0], "b": pair[1]}
    return QA_PROMPT.format(qa.question), None


def resolve_option(prediction: str, options: dict[str, str] | None) -> str:
    """An adversarial "(a)"/"(b)" reply → the option's text (as the official scorer does)."""
    if options is None:
        return prediction
    m = re.search(r"\(?\b([ab])\b\)", prediction.lower()) or re.match(r"\s*([ab])\b", prediction.lower())
    return options[m.group(1)] if m else prediction


def window_split(conv: Conversation, tokenizer, budget: int) -> tuple[str, list[tuple[str, list[str]]]]:
    """(the context text that fits `budget` tokens, the sessions' turns that do not).

    As the official `get_input_context`, turns are added from the newest back while the
    estimate fits; the dropped turns (older) are returned per session for the memory."""
    start = CONV_START.format(*conv.speakers)
    total = len(tokenizer.encode(start))
    kept: list[tuple[str, list[str]]] = []
    dropped: list[tuple[str, list[str]]] = []
    full = False
    for date, lines in reversed(conv.sessions):
        header = len(tokenizer.encode(session_text(date, [])))
        keep: list[str] = []
        for i in range(len(lines) - 1, -1, -1):
            n = len(tokenizer.encode(lines[i]))
            if full or total + header + n > budget:
                full = True
                dropped.insert(0, (date, list(lines[: i + 1])))
                break
            keep.insert(0, lines[i])
            total += n
        if keep:
            kept.insert(0, (date, keep))
            total += header
    return start + "".join(session_text(d, ls) for d, ls in kept), dropped


class Snapshot(NamedTuple):
    """Where a conversation's questions start: a prefilled context (shared by every row;
    None without context), the RoPE position after it, and the memory (one row; None when
    the protocol runs the frozen backbone)."""

    context: SharedPrefix | None
    position: int
    memory: MemoryState | None


class LoCoMoRunner:
    """Answers LoCoMo questions under each protocol with one δ-mem model (batch of questions
    per prefix snapshot)."""

    def __init__(self, model, tokenizer, *, batch: int = 8, sampling: Sampling = Sampling(), max_new_tokens: int = MAX_NEW_TOKENS,
                 seed: int = 0, log: Callable[[str], None] | None = None):  # fmt: skip
        self.model, self.tok = model, tokenizer
        self.config = memory_of(model).config
        self.batch, self.sampling, self.max_new_tokens, self.seed = batch, sampling, max_new_tokens, seed
        self.log = log or (lambda s: None)
        self.context = model.cfg.max_position_embeddings

    # -- rendering ------------------------------------------------------------------

    def _chat_prefix(self, conversation_text: str) -> list[int]:
        """The chat up to (and including) the conversation and the question prompt's common
        head; the rest of the question (`_chat_suffix`) follows in the same user turn."""
        marker = "\x00QUESTION\x00"
        full = self.tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": conversation_text + "\n\n" + marker}],
                                            add_generation_prompt=True)  # fmt: skip
        return self.tok.encode(full[: full.index(marker)] + QA_HEAD)

    def _chat_suffix(self, question: str) -> list[int]:
        """The end of the chat after `_chat_prefix`, for a `question_text` (which starts with QA_HEAD)."""
        if not question.startswith(QA_HEAD):
            raise ValueError("a question after a conversation prefix must be a question_text (starting with QA_HEAD)")
        marker = "\x00QUESTION\x00"
        full = self.tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": marker + question}],
                                            add_generation_prompt=True)  # fmt: skip
        return self.tok.encode(full[full.index(marker) + len(marker) + len(QA_HEAD) :])

    def question_room(self, conv: Conversation) -> int:
        """Cache slots a batch of this conversation's questions needs after the prefix."""
        longest = max(len(self._chat_suffix(question_text(q, self.seed)[0])) for q in conv.qa)
        return bucket(longest) + self.max_new_tokens

    # -- prefixes -------------------------------------------------------------------

    def _prefill_context(self, ids: list[int], memory: MemoryState | None, write: bool) -> Snapshot:
        length = prompt_length(len(ids))
        tokens, positions, valid = left_pad([ids], length)
        cache = KVCache.create(self.model.cfg, 1, length)
        control = write_control(self.config, valid) if write else WriteControl(WriteMode.READ_ONLY)

        def progress(done: int, total: int) -> None:
            self.log(f"prefill {done}/{total} tokens")

        st = prefill(self.model, tokens, positions, valid, cache, memory, control, progress=progress if length > 2048 else None)
        return Snapshot(SharedPrefix.of(st.cache), int(st.positions[0]), st.memory)

    def _remember(self, pieces: Sequence[str], memory: MemoryState | None = None) -> MemoryState:
        """Writes `pieces` into a memory exactly as a memory-only `Session.remember` would."""
        s = Session(self.model, self.tok, "memory-only", log=self.log)
        if memory is not None:
            s.memory = memory
        for i, text in enumerate(pieces):
            s.remember(text)
            self.log(f"remembered session {i + 1}/{len(pieces)}")
        return s.memory

    def prefix(self, conv: Conversation, protocol: str) -> Snapshot:
        """The snapshot this conversation's questions start from."""
        zero = MemoryState.zeros(self.model.cfg.num_layers, 1, self.config)
        room = self.question_room(conv)
        overhead = len(self._chat_prefix("")) + room
        if protocol in ("frozen", "official", "window_memory"):
            text, dropped = window_split(conv, self.tok, self.context - overhead - 16)
            ids = self._chat_prefix(text)
            if protocol == "frozen":
                return self._prefill_context(ids, None, False)
            memory = zero
            if protocol == "window_memory" and dropped:
                memory = self._remember([session_text(d, ls) for d, ls in dropped])
            return self._prefill_context(ids, memory, True)
        if protocol == "memory_only":
            return Snapshot(None, 0, self._remember([session_text(d, ls) for d, ls in conv.sessions]))
        if protocol == "no_history":
            return Snapshot(None, 0, None)
        raise ValueError(f"unknown protocol {protocol!r}; known: {PROTOCOLS}")

    # -- questions ------------------------------------------------------------------

    def _decode_texts(self, state: DecodeState, write: bool, key: jax.Array) -> list[str]:
        state = state.replace(key=key)
        mode = WriteMode.TOKENS if write else WriteMode.READ_ONLY
        # chunks of 10 steps, stopping once every reply in the batch has ended (−1 after a stop)
        pieces = stream(self.model, state, self.max_new_tokens, self.tok.eos_ids, self.sampling, chunk=10, write=mode)
        out = np.concatenate(list(pieces), axis=1)
        return [self.tok.decode([int(t) for t in row if t >= 0]).strip() for row in out]

    def answer(self, snapshot: Snapshot, protocol: str, questions: Sequence[QA], step: int = 0) -> list[str]:
        """Replies to `questions` from the protocol's snapshot (one batch)."""
        texts = [question_text(q, self.seed)[0] for q in questions]
        key = jax.random.PRNGKey(self.seed * 100003 + step)
        b = len(questions)
        memory = snapshot.memory
        if snapshot.context is not None:  # the question continues the prefix's user turn
            ids = [self._chat_suffix(t) for t in texts]
            length = bucket(max(len(i) for i in ids))
            if snapshot.position + length + self.max_new_tokens > self.context:
                raise ValueError(f"questions of {length} padded tokens do not fit after the prefix; raise question_room")
            cache = KVCache.create(self.model.cfg, b, length + bucket(self.max_new_tokens), prefix=snapshot.context)
            mem = None if memory is None else MemoryState(S=jnp.repeat(memory.S, b, axis=1))
            tokens, positions, valid = left_pad(ids, length)
            positions = positions + snapshot.position
            write = protocol != "frozen"
            control = write_control(self.config, valid, 1) if write else WriteControl(WriteMode.READ_ONLY)
            st = prefill(self.model, tokens, positions, valid, cache, mem, control)
            return self._decode_texts(st, write, key)
        # memory-only / no-history: asked as `Session.ask` asks (fresh context, no writes)
        ids = [sum(memory_only_turn(self.tok, DEFAULT_SYSTEM, {"role": "user", "content": t}, True), []) for t in texts]
        length = bucket(max(len(i) for i in ids))
        tokens, positions, valid = left_pad(ids, length)
        cache = KVCache.create(self.model.cfg, b, length + bucket(self.max_new_tokens))
        mem = None if memory is None else MemoryState(S=jnp.repeat(memory.S, b, axis=1))
        st = prefill(self.model, tokens, positions, valid, cache, mem, WriteControl(WriteMode.READ_ONLY))
        return self._decode_texts(st, False, key)

    def run(self, conv: Conversation, protocol: str, questions: Sequence[QA], done: set[int] = frozenset(),
            stop: Callable[[], bool] = lambda: False) -> Iterator[dict]:  # fmt: skip
        """Yields one scored record per question not in `done` (question indices); `stop()`
        is asked before each batch (a time limit: whole batches only, so nothing is lost).
        Questions are batched shortest first, so a batch's padded length fits its rows."""
        todo = sorted((q for q in questions if q.index not in done), key=lambda q: (len(question_text(q, self.seed)[0]), q.index))
        if not todo or stop():
            return
        snapshot = self.prefix(conv, protocol)
        for start in range(0, len(todo), self.batch):
            if stop():
                return
            chunk = todo[start : start + self.batch]
            replies = self.answer(snapshot, protocol, chunk, step=chunk[0].index)
            for q, reply in zip(chunk, replies):
                options = question_text(q, self.seed)[1]
                prediction = resolve_option(reply, options)
                yield {
                    "protocol": protocol, "sample_id": conv.sample_id, "qa_index": q.index, "category": q.category,
                    "question": q.question, "answer": q.answer, "reply": reply, "prediction": prediction,
                    "f1": score(prediction, q.answer, q.category),
                }  # fmt: skip


__all__ = ["CONV_START", "Conversation", "DEFAULT_DATA", "LoCoMoRunner", "NO_INFO", "OFFICIAL_SAMPLING", "PROTOCOLS", "QA", "Snapshot",
           "load_conversations", "question_text", "resolve_option", "session_text", "window_split"]  # fmt: skip
