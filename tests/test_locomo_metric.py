"""LoCoMo answer metric: each official rule on hand-made cases (pure Python, no model)."""

from __future__ import annotations

import pytest

from deltamem_jax.evaluation.locomo_metric import CATEGORY_NAMES, normalize_answer, score, summarize, token_f1


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Cat", "cat"),
        ("A dog, an owl and the cat!", "dog owl cat"),  # "and" goes too, as in the official code
        ("  Hello,   World.  ", "hello world"),
        ("theme park", "theme park"),  # articles only as whole words
        ("Mother's Day", "mothers day"),
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_stemming_matches_inflections() -> None:
    assert token_f1("running", "run") == 1.0
    assert token_f1("Runs.", "run") == 1.0


def test_token_f1_arithmetic() -> None:
    # pred -> [red, appl, green, pear] ("and" dropped), gold -> [green, appl]: 2 shared,
    # precision 2/4, recall 2/2, F1 = 2 * 0.5 * 1 / 1.5 = 2/3
    assert token_f1("red apples and green pears", "green apple") == pytest.approx(2 / 3)
    # a repeated token counts once per gold occurrence: P = 1/2, R = 1 -> 2/3
    assert token_f1("Paris Paris", "Paris") == pytest.approx(2 / 3)
    assert token_f1("Paris", "London") == 0.0


def test_token_f1_empty_sides_score_zero() -> None:
    assert token_f1("", "Paris") == 0.0
    assert token_f1("Paris", "the") == 0.0  # empty after normalization
    assert token_f1("", "") == 0.0


def test_category_1_splits_on_commas() -> None:
    # gold parts [sweden, paris]: best F1 per part 0 and 1 -> mean 0.5 (plain token F1 would give 2/3)
    assert score("Paris", "Sweden, Paris", 1) == pytest.approx(0.5)
    assert score("Paris, Sweden", "Sweden, Paris", 1) == 1.0
    # no comma in the reply: one part, F1 2/3 against each gold part
    assert score("Sweden and Paris", "Sweden, Paris", 1) == pytest.approx(2 / 3)


def test_category_3_scores_gold_before_semicolon() -> None:
    gold = "National park; she likes the outdoors"
    assert score("a national park", gold, 3) == 1.0
    assert token_f1("a national park", gold) < 1.0  # the rationale would otherwise count


def test_semicolon_kept_outside_category_3() -> None:
    assert score("yes", "yes; it is", 4) == pytest.approx(0.5)  # gold [yes, it, is]: P 1, R 1/3


@pytest.mark.parametrize(
    "reply",
    ["No information available.", "That is NOT MENTIONED in the conversation.", "It was not mentioned"],
)
def test_category_5_abstention_scores_one(reply: str) -> None:
    assert score(reply, None, 5) == 1.0


@pytest.mark.parametrize("reply", ["Paris", "I don't know", "no information", "It is not in the conversation"])
def test_category_5_answer_scores_zero(reply: str) -> None:
    assert score(reply, "Paris", 5) == 0.0


def test_int_gold_answers() -> None:
    assert score("2022.", 2022, 2) == 1.0
    assert score("2019, 2022", 2022, 1) == 1.0
    assert score("2021", 2022, 4) == 0.0


def test_category_2_and_4_plain_token_f1() -> None:
    for category in (2, 4):
        assert score("Paris", "Sweden, Paris", category) == pytest.approx(2 / 3)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError):
        score("x", "x", 6)
    with pytest.raises(ValueError):
        score("x", None, 4)
    with pytest.raises(ValueError):
        summarize([{"category": 0, "f1": 1.0}])


def test_summarize_weights_questions_over_categories_1_to_4() -> None:
    records = [
        {"category": 1, "f1": 1.0},
        {"category": 1, "f1": 1.0},
        {"category": 2, "f1": 0.0},
        {"category": 5, "f1": 1.0},
    ]
    out = summarize(records)
    # question-weighted 2/3 (not the category mean 0.5, nor 0.75 with category 5)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["questions"] == 3
    assert out["per_category"] == {
        "multi-hop": {"f1": 1.0, "questions": 2},
        "temporal": {"f1": 0.0, "questions": 1},
        "adversarial": {"f1": 1.0, "questions": 1},
    }


def test_summarize_without_reported_categories() -> None:
    assert summarize([{"category": 5, "f1": 1.0}])["f1"] is None
    assert summarize([]) == {"f1": None, "per_category": {}, "questions": 0}


def test_category_names() -> None:
    assert CATEGORY_NAMES == {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
