"""Seeded recall suites: passkey retrieval, multi-fact saturation, fact updates.

passkey     a 5-digit key stated once at a relative depth of a history of filler turns,
            written memory-only turn by turn (histories may be far longer than the context
            window); asked memory-only. Metric: the key appears in the reply (the usual
            passkey accuracy). The control asks with an empty memory.
facts       n facts (eval split, no chit-chat) written as `Session.remember` writes them;
            one asked. Accuracy with the episode's memory vs another episode's memory as n
            grows: where does an r×r state saturate?
updates     a fact stated, then restated with a new value (MemoryAgentBench's conflict
            resolution): accuracy of the later value, and how often the old one is given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from deltamem_jax.evaluation.recall import RecallEvaluator, correct, normalize
from deltamem_jax.session import Session
from deltamem_jax.training.batches import Layout, Renderer
from deltamem_jax.training.data import CHITCHAT, EpisodeConfig, episodes

PASSKEY_QUESTION = "What is the pass key? Answer with the number."


@dataclasses.dataclass(frozen=True)
class PasskeyTrial:
    turns: tuple[str, ...]  # history turns, the key in one of them
    key: str
    depth: float  # relative position of the key's turn, 0 = first


def passkey_trial(seed: int, history_tokens: int, depth: float, turn_words: int = 120) -> PasskeyTrial:
    """Filler turns of about `turn_words` words (≈1.3 tokens each) totalling ≈`history_tokens`
    tokens, with "The pass key is K. Remember it." in the turn at `depth`."""
    rng = np.random.default_rng([seed, history_tokens, int(depth * 1000)])
    key = str(int(rng.integers(10000, 100000)))
    n_turns = max(1, round(history_tokens / (turn_words * 1.3)))
    turns = []
    for _ in range(n_turns):
        words: list[str] = []
        while len(words) < turn_words:
            words += str(rng.choice(CHITCHAT)).split()
        turns.append(" ".join(words[:turn_words]))
    at = min(n_turns - 1, int(depth * n_turns))
    words = turns[at].split()
    cut = len(words) // 2
    turns[at] = " ".join(words[:cut] + [f"The pass key is {key}. Remember it."] + words[cut:])
    return PasskeyTrial(tuple(turns), key, depth)


def run_passkey(model, tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int = 0, log=None) -> list[dict]:
    """One record per trial: memory-only reply and the empty-memory control's reply."""
    records = []
    blank = Session(model, tokenizer, "memory-only", max_new_tokens=16)
    control = blank.ask(PASSKEY_QUESTION)
    for length in lengths:
        for depth in depths:
            for i in range(trials):
                trial = passkey_trial(seed + i, length, depth)
                s = Session(model, tokenizer, "memory-only", max_new_tokens=16)
                for turn in trial.turns:
                    s.remember(turn)
                reply = s.ask(PASSKEY_QUESTION)
                records.append({"suite": "passkey", "history_tokens": length, "depth": depth, "trial": i, "key": trial.key,
                                "reply": reply, "correct": trial.key in reply, "control_correct": trial.key in control})  # fmt: skip
                if log:
                    log(f"passkey {length} tokens, depth {depth}: {'ok' if trial.key in reply else 'miss'} ({reply[:40]!r})")
    return records


def run_facts(model, tokenizer, counts: Sequence[int], episodes_per_count: int, seed: int = 4321, log=None,
              relations: tuple[str, ...] = ()) -> list[dict]:  # fmt: skip
    """One record per episode with n facts (of the `relations` kinds; () = all): correct with
    its own and with another episode's memory."""
    records = []
    for n in counts:
        cfg = EpisodeConfig(min_facts=n, max_facts=n, max_chitchat=0, update_rate=0.0, never_said_rate=0.0, relations=relations)
        ev = RecallEvaluator(model, tokenizer, renderer=Renderer(tokenizer, Layout(max_turns=cfg.max_turns)))
        eps = episodes(seed, "eval", 0, episodes_per_count, cfg)
        ans = ev.answers(eps, ("memory_only", "mismatched_memory"))
        for j, e in enumerate(eps):
            records.append({"suite": "facts", "num_facts": n, "relation": e.relation, "value": e.value,
                            "reply": ans["memory_only"][j], "correct": correct(ans["memory_only"][j], e),
                            "mismatched_correct": correct(ans["mismatched_memory"][j], e)})  # fmt: skip
        if log:
            log(f"facts n={n}: {np.mean([r['correct'] for r in records if r['num_facts'] == n]):.2f}")
    return records


def run_updates(model, tokenizer, n_episodes: int, seed: int = 987, log=None, relations: tuple[str, ...] = ()) -> list[dict]:
    """Episodes whose asked fact was restated with a new value: the later value must win."""
    cfg = EpisodeConfig(min_facts=1, max_facts=3, max_chitchat=0, update_rate=1.0, never_said_rate=0.0, relations=relations)
    ev = RecallEvaluator(model, tokenizer, renderer=Renderer(tokenizer, Layout(max_turns=cfg.max_turns)))
    eps = [e for e in episodes(seed, "eval", 0, n_episodes, cfg)]
    ans = ev.answers(eps, ("memory_only", "mismatched_memory"))
    records = []
    for j, e in enumerate(eps):
        old = _old_value(e)
        reply = ans["memory_only"][j]
        records.append({"suite": "updates", "value": e.value, "old_value": old, "reply": reply, "correct": correct(reply, e),
                        "old_given": bool(old) and normalize(old) in normalize(reply),
                        "mismatched_correct": correct(ans["mismatched_memory"][j], e)})  # fmt: skip
    if log:
        log(f"updates: later value {np.mean([r['correct'] for r in records]):.2f}, old value {np.mean([r['old_given'] for r in records]):.2f}")
    return records


def _old_value(e) -> str:
    """The value the update replaced: the asked relation's first statement's value."""
    from deltamem_jax.training.data import RELATIONS

    rel = next(r for r in RELATIONS if r.kind == e.relation)
    for turn in e.turns:
        for template in rel.statements:
            head, _, tail = template.partition("{v}")
            if turn.startswith(head) and turn.endswith(tail) and len(turn) > len(head) + len(tail):
                value = turn[len(head) : len(turn) - len(tail)]
                if value != e.value:
                    return value
    return ""


def summarize_suites(records: Sequence[dict]) -> dict:
    def mean(rs, key):
        return float(np.mean([r[key] for r in rs])) if rs else None

    pk = [r for r in records if r["suite"] == "passkey"]
    facts = [r for r in records if r["suite"] == "facts"]
    ups = [r for r in records if r["suite"] == "updates"]
    return {
        "passkey": {
            "accuracy": mean(pk, "correct"), "control_accuracy": mean(pk, "control_correct"),
            "by_length": {str(n): mean([r for r in pk if r["history_tokens"] == n], "correct") for n in sorted({r["history_tokens"] for r in pk})},
            "by_depth": {str(d): mean([r for r in pk if r["depth"] == d], "correct") for d in sorted({r["depth"] for r in pk})},
            "grid": [{"history_tokens": n, "depth": d, "accuracy": mean([r for r in pk if r["history_tokens"] == n and r["depth"] == d], "correct")}
                     for n in sorted({r["history_tokens"] for r in pk}) for d in sorted({r["depth"] for r in pk})],
        } if pk else None,
        "facts": {str(n): {"accuracy": mean(rs, "correct"), "mismatched": mean(rs, "mismatched_correct"), "n": len(rs)}
                  for n in sorted({r["num_facts"] for r in facts}) for rs in [[r for r in facts if r["num_facts"] == n]]} if facts else None,
        "updates": {"later_value": mean(ups, "correct"), "old_value": mean(ups, "old_given"), "mismatched": mean(ups, "mismatched_correct"), "n": len(ups)} if ups else None,
    }  # fmt: skip


__all__ = ["PASSKEY_QUESTION", "PasskeyTrial", "passkey_trial", "run_facts", "run_passkey", "run_updates", "summarize_suites"]
