"""LoCoMo's official answer metric (snap-research/locomo, task_eval/evaluation.py).

Scores must be comparable with published LoCoMo numbers, so this follows the official
`normalize_answer`, `f1_score`, `f1` and the per-category branch of
`eval_question_answering` rule for rule, including their quirks (the word "and" is
dropped like an article; category 5 checks the lowercased, not normalized, reply).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable

from nltk.stem import PorterStemmer

CATEGORY_NAMES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
# categories whose question-weighted mean papers report (Mem0, A-Mem, δ-mem): all but adversarial
REPORTED_CATEGORIES = (1, 2, 3, 4)
# the official adversarial rule: the reply declines with one of these phrases
ABSTAIN_PHRASES = ("no information available", "not mentioned")

_STEMMER = PorterStemmer()
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the|and)\b")


def normalize_answer(s: str) -> str:
    """Lowercase, drop ASCII punctuation, drop a/an/the/and, collapse whitespace (official order)."""
    s = s.replace(",", "").lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _stemmed_tokens(s: str) -> list[str]:
    return [_STEMMER.stem(w) for w in normalize_answer(s).split()]


def token_f1(prediction: str, gold: str) -> float:
    """F1 of the bag-of-stemmed-tokens overlap; 0 when nothing overlaps (so also when either side is empty)."""
    pred, ref = _stemmed_tokens(prediction), _stemmed_tokens(gold)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _multi_answer_f1(prediction: str, gold: str) -> float:
    """Official `f1`: mean over comma-separated gold parts of the best F1 over predicted parts."""
    preds = [p.strip() for p in prediction.split(",")]
    golds = [g.strip() for g in gold.split(",")]
    return sum(max(token_f1(p, g) for p in preds) for g in golds) / len(golds)


def score(prediction: str, gold: str | int | None, category: int) -> float:
    """One question's score under its category's official rule (gold may be an int year, or None for 5)."""
    if category == 5:  # gold is unused: the answer is that the conversation does not say
        reply = prediction.lower()
        return 1.0 if any(phrase in reply for phrase in ABSTAIN_PHRASES) else 0.0
    if category not in CATEGORY_NAMES:
        raise ValueError(f"unknown LoCoMo category {category!r}; expected one of {sorted(CATEGORY_NAMES)}")
    if gold is None:
        raise ValueError(f"category {category} question has no gold answer")
    gold = str(gold)
    if category == 1:
        return _multi_answer_f1(prediction, gold)
    if category == 3:  # gold holds "answer; rationale": only the answer is scored
        gold = gold.split(";")[0].strip()
    return token_f1(prediction, gold)


def summarize(records: Iterable[dict]) -> dict:
    """Per-category means and the question-weighted F1 over categories 1–4, the number papers report.

    The official `analyze_aggr_acc` overall also weights in category 5; follow-up work leaves it
    out, so it is reported only under `per_category`.
    """
    totals: dict[int, float] = {}
    counts: dict[int, int] = {}
    for r in records:
        category = r["category"]
        if category not in CATEGORY_NAMES:
            raise ValueError(f"unknown LoCoMo category {category!r}")
        totals[category] = totals.get(category, 0.0) + float(r["f1"])
        counts[category] = counts.get(category, 0) + 1
    reported = [c for c in REPORTED_CATEGORIES if c in counts]
    questions = sum(counts[c] for c in reported)
    return {
        "f1": sum(totals[c] for c in reported) / questions if questions else None,
        "per_category": {
            CATEGORY_NAMES[c]: {"f1": totals[c] / counts[c], "questions": counts[c]} for c in sorted(counts)
        },
        "questions": questions,
    }


__all__ = ["ABSTAIN_PHRASES", "CATEGORY_NAMES", "REPORTED_CATEGORIES", "normalize_answer", "score", "summarize", "token_f1"]
