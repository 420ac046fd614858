"""Held-out recall of told facts, in five conditions, and the perplexity cost of the memory.

Conditions (greedy answers to the same held-out questions):
  floor              frozen model, no history: system prompt + question
  ceiling            frozen model with the whole history in its context
  memory_only        δ-mem, history written turn by turn as `Session.remember` writes it
                     (the training code's `write_pass`), question asked as `Session.ask`
  context_memory     δ-mem with the history in the context and written into the memory
                     during prefill and decode (the official evaluation protocol)
  mismatched_memory  memory_only with another episode's memory (the batch rolled by one):
                     only what memory_only gains over this is recall of the told facts

An answer is correct when the normalized reply contains the normalized value; for a
question about something never said, when the reply says it was not told.
"""

from __future__ import annotations

import collections
import json
import re
import string
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltamem_jax.adapter import memory_of
from deltamem_jax.decoding import bucket, left_pad, prefill, stream
from deltamem_jax.state import MemoryState, WriteControl, WriteMode
from deltamem_jax.training.batches import Renderer
from deltamem_jax.training.data import Episode
from deltamem_jax.training.step import write_pass
from models.decoder import KVCache

CONDITIONS = ("floor", "ceiling", "memory_only", "context_memory", "mismatched_memory")
NOT_TOLD = ("haven't told", "have not told", "didn't tell", "did not tell", "don't know", "do not know",
            "not mentioned", "haven't mentioned", "no information", "not sure what")  # fmt: skip


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD-style)."""
    text = text.lower().replace("’", "'")
    text = "".join(c for c in text if c not in set(string.punctuation) - {"'"})
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    p, g = normalize(prediction).split(), normalize(gold).split()
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if not p or not g or not common:
        return float(p == g)
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def correct(reply: str, ep: Episode) -> bool:
    if ep.never_said:
        r = reply.lower().replace("’", "'")
        return any(s in r for s in NOT_TOLD)
    return normalize(ep.value) in normalize(reply)


def digits_in_place(reply: str, value: str) -> float:
    """Fraction of a numeric value's digits that the reply's first number has in the same
    places: the partial recall of a code that exact-match accuracy counts as wrong."""
    got = re.search(r"\d+", reply)
    got = got.group() if got else ""
    return sum(a == b for a, b in zip(value, got)) / len(value)


class RecallEvaluator:
    """Batched greedy answers of one model (δ-mem attached) in the five conditions."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 24, renderer: Renderer | None = None):
        self.model, self.tok = model, tokenizer
        self.renderer = renderer or Renderer(tokenizer)
        self.max_new_tokens = max_new_tokens
        self.config = memory_of(model).config
        graphdef, state = nnx.split(model)
        self._write = jax.jit(lambda s, batch: write_pass(nnx.merge(graphdef, s), batch, MemoryState.zeros(
            model.cfg.num_layers, batch.read.tokens.shape[0], self.config), remat=False))  # fmt: skip
        self._state = state

    def _generate(self, prompts: Sequence[Sequence[int]], memory: MemoryState | None, write: bool) -> list[str]:
        length = bucket(max(len(p) for p in prompts))
        tokens, positions, valid = left_pad(prompts, length)
        cache = KVCache.create(self.model.cfg, len(prompts), length + bucket(self.max_new_tokens))
        mode = WriteMode.TOKENS if write else WriteMode.READ_ONLY
        state = prefill(self.model, tokens, positions, valid, cache, memory, WriteControl(mode))
        # chunks of 8 steps, stopping once every reply has ended (−1 after a stop; whole on every process)
        out = np.concatenate(list(stream(self.model, state, self.max_new_tokens, self.tok.eos_ids, chunk=8, write=mode)), axis=1)
        return [self.tok.decode([int(t) for t in row if t >= 0]) for row in out]

    def answers(self, eps: Sequence[Episode], conditions: Sequence[str] = CONDITIONS) -> dict[str, list[str]]:
        r = self.renderer
        ask = [r.system_ids + r.question_ids(e.question) for e in eps]
        full = [r.context_ids(e) for e in eps]  # history and question in one context, as training's context term reads it
        out = {}
        if {"memory_only", "mismatched_memory"} & set(conditions):
            memory = self._write(self._state, jax.tree.map(jnp.asarray, r.batch(eps, "session")))
        zero = MemoryState.zeros(self.model.cfg.num_layers, len(eps), self.config)
        for c in conditions:
            if c == "floor":
                out[c] = self._generate(ask, None, False)
            elif c == "ceiling":
                out[c] = self._generate(full, None, False)
            elif c == "memory_only":
                out[c] = self._generate(ask, memory, False)
            elif c == "mismatched_memory":
                out[c] = self._generate(ask, MemoryState(S=jnp.roll(memory.S, 1, axis=1)), False)
            elif c == "context_memory":
                out[c] = self._generate(full, zero, True)
            else:
                raise ValueError(f"unknown condition {c!r}; known: {CONDITIONS}")
        return out


def summarize(records: list[dict], conditions: Sequence[str] = CONDITIONS) -> dict:
    """Accuracy and F1 per condition on answerable questions, with breakdowns; never-said
    and updated questions also on their own."""
    answerable = [r for r in records if not r["never_said"]]

    def stats(rs):
        if not rs:
            return None
        return {c: {"accuracy": float(np.mean([r[c]["correct"] for r in rs])), "f1": float(np.mean([r[c]["f1"] for r in rs]))}
                for c in conditions} | {"n": len(rs)}  # fmt: skip

    def digit_stats(rs):
        return {c: float(np.mean([digits_in_place(r[c]["reply"], str(r["value"])) for r in rs])) for c in conditions} | {"n": len(rs)}

    def by(key, rs, summary=stats):
        groups = collections.defaultdict(list)
        for r in rs:
            groups[str(r[key])].append(r)
        return {k: summary(v) for k, v in sorted(groups.items(), key=lambda kv: (len(kv[0]), kv[0]))}

    overall = stats(answerable)
    numeric = [r for r in answerable if str(r["value"]).isdigit()]
    digits = None
    if numeric:  # how many facts share the memory decides how much of each number survives
        digits = digit_stats(numeric) | {"by_num_facts": by("num_facts", numeric, digit_stats)}
    return {
        **{c: overall[c]["accuracy"] for c in conditions},
        "f1": {c: overall[c]["f1"] for c in conditions},
        "n_answerable": len(answerable),
        "by_relation": by("relation", answerable),
        "by_num_facts": by("num_facts", answerable),
        "by_turns_ago": by("turns_ago", answerable),
        "updated": stats([r for r in answerable if r["updated"]]),
        "never_said": stats([r for r in records if r["never_said"]]),
        "digits_in_place": digits,  # numeric values (codes, numbers) only
    }


def perplexity(model, token_chunks: Sequence[Sequence[int]], with_memory: bool) -> float:
    """Perplexity of text chunks; with memory, each chunk is written while it is read
    (context+memory) from a zero state."""
    n = max(len(c) for c in token_chunks)
    tokens, positions, valid = left_pad(token_chunks, n)
    cache = KVCache.create(model.cfg, len(token_chunks), n)
    memory = MemoryState.zeros(model.cfg.num_layers, len(token_chunks), memory_of(model).config) if with_memory else None
    from deltamem_jax.forward import forward

    logits, _, _ = forward(model, tokens, positions, valid, cache, memory, WriteControl(WriteMode.TOKENS), attend_cache=False)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    mask = valid[:, 1:] & valid[:, :-1]
    return float(jnp.exp(jnp.sum(nll * mask) / jnp.sum(mask)))


def plain_text_chunks(tokenizer, path: str | Path | None, chunks: int, length: int) -> tuple[list[list[int]], str]:
    """Held-out plain text: LoCoMo dialogue (never used in training) if the file exists."""
    if path is not None and Path(path).is_file():
        data = json.loads(Path(path).read_text())
        lines = []
        for sample in data:
            conv = sample["conversation"]
            for k in sorted((k for k in conv if re.fullmatch(r"session_\d+", k)), key=lambda k: int(k.split("_")[1])):
                lines += [f"{t['speaker']}: {t['text']}" for t in conv[k]]
        ids = tokenizer.encode("\n".join(lines))
        source = f"LoCoMo dialogue text ({path})"
    else:
        raise FileNotFoundError(f"no plain text for perplexity at {path}; pass --ppl-text")
    if len(ids) < chunks * length:
        raise ValueError(f"{source} has {len(ids)} tokens, fewer than {chunks} × {length}")
    step = len(ids) // chunks
    return [ids[i * step : i * step + length] for i in range(chunks)], source


__all__ = ["CONDITIONS", "RecallEvaluator", "correct", "normalize", "perplexity", "plain_text_chunks", "summarize", "token_f1"]
