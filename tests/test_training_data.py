"""The episode generator: deterministic, disjoint splits, the promised variety; recall scoring."""

from __future__ import annotations

import collections

import pytest

from deltamem_jax.evaluation.recall import CONDITIONS, correct, digits_in_place, normalize, summarize, token_f1
from deltamem_jax.training import data


def test_deterministic_per_seed():
    a = data.episodes(7, "train", 100, 20)
    assert a == data.episodes(7, "train", 100, 20)
    assert a[5] == data.make_episode(7, "train", 105)  # any position, without its predecessors
    assert a != data.episodes(8, "train", 100, 20)


def _values_and_phrasings(split: str, n: int = 3000):
    values, statements, questions = set(), set(), set()
    for e in data.episodes(0, split, 0, n):
        if e.value:
            values.add(e.value)
        questions.add(e.question)
    for rel in data.RELATIONS:
        s, q = rel.phrasings(split)
        statements |= set(s)
        questions |= set(q)
    return values, statements, questions


def test_splits_are_disjoint_in_values_and_phrasings():
    tv, ts, tq = _values_and_phrasings("train")
    ev, es, eq = _values_and_phrasings("eval")
    assert not tv & ev
    assert not ts & es
    assert not tq & eq
    assert not data.split_values("train") & data.split_values("eval")
    # no eval value appears anywhere in a training turn either
    train_text = " ".join(t for e in data.episodes(0, "train", 0, 1000) for t in e.turns)
    assert not [v for v in sorted(ev) if f" {v}." in train_text or f" {v} " in train_text]


def test_variety_the_issue_asks_for():
    assert len(data.RELATIONS) >= 12
    for rel in data.RELATIONS:
        assert len(rel.statements) >= 5 and len(rel.questions) >= 3, rel.kind
    eps = data.episodes(1, "train", 0, 2000)
    assert {e.num_facts for e in eps} == set(range(1, 7))
    assert {e.relation for e in eps} == {r.kind for r in data.RELATIONS}
    kinds = collections.Counter((e.updated, e.never_said) for e in eps)
    assert kinds[(True, False)] > 100 and kinds[(False, True)] > 100 and kinds[(False, False)] > 1000
    assert any(t in data.CHITCHAT for e in eps for t in e.turns)


def test_updates_and_never_said():
    for e in data.episodes(2, "eval", 0, 500):
        if e.never_said:
            assert e.value == "" and "haven't told me" in e.answer and e.turns_ago == -1
            continue
        assert e.value in e.answer
        stated = [i for i, t in enumerate(e.turns) if e.value in t]
        assert stated and len(e.turns) - 1 - stated[-1] == e.turns_ago
        if e.updated:  # the later value wins: the answer's value is in the update turn
            assert any(e.turns[stated[-1]].startswith(u.split("{")[0]) for u in data.UPDATES)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="min_facts"):
        data.EpisodeConfig(min_facts=3, max_facts=2)
    with pytest.raises(ValueError, match="split"):
        data.make_episode(0, "test", 0)


def test_recall_scoring():
    assert normalize("The  Blue, Toyota!") == "blue toyota"
    ep = data.Episode(("I drive a blue Toyota.",), "What car do I drive?", "Your car is a blue Toyota.", "a blue Toyota",
                      "car", 1, 0, False, False)  # fmt: skip
    assert correct("Your car is a Blue Toyota.", ep) and not correct("Your car is a red Toyota.", ep)
    never = data.Episode(("Hi",), "What is my door code?", "You haven't told me your door code.", "", "door_code", 1, -1, False, True)
    assert correct("You haven’t told me that.", never) and not correct("Your door code is 1234.", never)
    assert token_f1("Your car is a blue Toyota", "Your car is a blue Toyota.") == 1.0
    assert token_f1("nothing", "Your car") == 0.0
    assert 0 < token_f1("Your car is red", "Your car is a blue Toyota.") < 1
    rec = {"relation": "car", "value": "a blue Toyota", "num_facts": 1, "turns_ago": 0, "updated": False, "never_said": False}
    records = [dict(rec, **{c: {"correct": c == "ceiling", "f1": 0.5} for c in CONDITIONS}),
               dict(rec, never_said=True, **{c: {"correct": True, "f1": 1.0} for c in CONDITIONS})]  # fmt: skip
    s = summarize(records)
    assert s["ceiling"] == 1.0 and s["floor"] == 0.0 and s["n_answerable"] == 1
    assert s["never_said"]["floor"]["accuracy"] == 1.0 and s["by_relation"]["car"]["n"] == 1
    assert s["digits_in_place"] is None  # no numeric values


def test_digits_in_place_scores_partial_recall_of_numbers():
    assert digits_in_place("Your door code is 2472.", "2472") == 1.0
    assert digits_in_place("Your door code is 5762.", "2472") == 0.25  # only the last 2 in its place
    assert digits_in_place("Locker 56, then 536", "536") == 1 / 3  # the first number counts: its 5
    assert digits_in_place("I don't know.", "2472") == 0.0
    code = {"relation": "door_code", "value": "2472", "num_facts": 1, "turns_ago": 0, "updated": False, "never_said": False}
    replies = {"memory_only": "It is 2472.", "mismatched_memory": "It is 9999."}
    records = [dict(code, **{c: {"reply": replies.get(c, "no"), "correct": False, "f1": 0.0} for c in CONDITIONS})]
    three = dict(code, num_facts=3, **{c: {"reply": "It is 2400.", "correct": False, "f1": 0.0} for c in CONDITIONS})
    s = summarize(records + [three])["digits_in_place"]
    assert s["n"] == 2 and s["memory_only"] == 0.75 and s["mismatched_memory"] == 0.25 and s["floor"] == 0.25
    one, three = s["by_num_facts"]["1"], s["by_num_facts"]["3"]
    assert one["n"] == three["n"] == 1 and one["memory_only"] == 1.0 and one["mismatched_memory"] == 0.0 and three["memory_only"] == 0.5


def test_relation_subset_for_a_curriculum():
    config = data.EpisodeConfig(min_facts=1, max_facts=2, relations=("door_code", "locker", "colour"))
    eps = data.episodes(3, "train", 0, 300, config)
    assert {e.relation for e in eps} == {"door_code", "locker", "colour"}  # the never-said ones too
    assert data.episodes(3, "train", 0, 50) == data.episodes(3, "train", 0, 50, data.EpisodeConfig(relations=()))
    with pytest.raises(ValueError, match="unknown relation kinds \\['door'\\]"):
        data.EpisodeConfig(relations=("door",))
    with pytest.raises(ValueError, match="max_facts ≤ 2"):
        data.EpisodeConfig(max_facts=3, relations=("door_code", "locker", "colour"))
    # without never-said questions every kind of the subset can be stated in one episode
    whole = data.EpisodeConfig(min_facts=3, max_facts=3, max_chitchat=0, update_rate=0.0, never_said_rate=0.0, relations=("door_code", "locker", "colour"))
    assert all(e.num_facts == 3 and len(e.turns) == 3 and not e.never_said for e in data.episodes(3, "train", 0, 20, whole))
