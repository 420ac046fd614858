"""Plain chat transcripts for the KL term that keeps the backbone's behaviour while the memory fills.

The recall loss says nothing about ordinary text, and the corrections it learns raised
the perplexity of held-out dialogue by 27–54% (docs/RESULTS.md), most of it over long
text written into the memory. The KL term runs a transcript as `Session` runs a
context-and-memory conversation (in the context and written into the memory, token by
token) and penalizes KL(frozen backbone ‖ δ-mem) of the next-token distribution at every
position.

The transcripts are built from the frozen backbone's own greedy replies to chit-chat and
to training-split fact statements, so no outside corpus is needed and the text is what
the model itself writes in a chat. (LoCoMo, where perplexity is measured, is never used.)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from deltamem_jax.training.data import CHITCHAT, EpisodeConfig, episodes

CORPUS_FILE = "plain_corpus.json"


@dataclasses.dataclass(frozen=True)
class PlainCorpus:
    system_ids: list[int]  # the rendered system message
    pairs: list[list[int]]  # one user turn and the backbone's reply each, rendered by the chat template

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def corpus_prompts(seed: int, facts: int = 40) -> list[str]:
    """User turns to reply to: every chit-chat line and `facts` training-split fact statements."""
    one_fact = EpisodeConfig(min_facts=1, max_facts=1, max_chitchat=0, update_rate=0.0, never_said_rate=0.0)
    return list(CHITCHAT) + [e.turns[0] for e in episodes(seed, "train", 0, facts, one_fact)]


def build_corpus(model, tokenizer, system_prompt: str, prompts: list[str], max_new_tokens: int = 96, batch: int = 16) -> PlainCorpus:
    """Greedy replies of `model` (a backbone without δ-mem: the frozen reference) to each prompt."""
    from deltamem_jax.decoding import generate
    from deltamem_jax.memory import DeltaMemAttention
    from deltamem_jax.session import memory_only_turn

    if isinstance(model.layers.attn, DeltaMemAttention):
        raise ValueError("build the plain-text corpus with the backbone alone, before δ-mem is attached")
    system = [{"role": "system", "content": system_prompt}]
    sys_text = tokenizer.apply_chat_template(system, add_generation_prompt=False)
    pairs = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        asks = [sum(memory_only_turn(tokenizer, system_prompt, {"role": "user", "content": p}, True), []) for p in chunk]
        replies, _ = generate(model, asks, max_new_tokens, stop_ids=tokenizer.eos_ids)
        for p, r in zip(chunk, replies):
            text = tokenizer.decode([t for t in r if t not in tokenizer.eos_ids]).strip()
            full = tokenizer.apply_chat_template(system + [{"role": "user", "content": p}, {"role": "assistant", "content": text}],
                                                 add_generation_prompt=False)  # fmt: skip
            pairs.append(tokenizer.encode(full[len(sys_text) :]))
    return PlainCorpus(tokenizer.encode(sys_text), pairs)


def load_or_build(folder: Path, model, tokenizer, system_prompt: str, seed: int) -> PlainCorpus:
    """The run's corpus: read from `folder` (a resumed run uses the same text), else built and saved."""
    path = Path(folder) / CORPUS_FILE
    if path.is_file():
        return PlainCorpus(**json.loads(path.read_text()))
    corpus = build_corpus(model, tokenizer, system_prompt, corpus_prompts(seed))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(corpus.to_json()))
    tmp.replace(path)  # atomic: a killed run never leaves half a corpus
    return corpus


def transcripts(corpus: PlainCorpus, seed: int, first: int, count: int, length: int):
    """Rows [first, first+count) of a seeded stream of transcripts: the system message,
    then user/reply pairs in a random order, cut at `length` tokens. Returns a `Segment`
    [count, length] (no padding; positions from 0)."""
    from deltamem_jax.training.batches import Segment

    if sum(map(len, corpus.pairs)) + len(corpus.system_ids) < length:
        raise ValueError(f"the plain-text corpus holds fewer than {length} tokens; lower the transcript length")
    rows = []
    for i in range(first, first + count):
        rng = np.random.default_rng([seed, 7, i])
        ids = list(corpus.system_ids)
        for j in rng.permutation(len(corpus.pairs)):
            if len(ids) >= length:
                break
            ids += corpus.pairs[j]
        rows.append(ids[:length])
    tokens = np.asarray(rows, np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()
    return Segment(tokens, positions, np.ones_like(tokens, bool))
