"""HotpotQA answer metrics against the official definitions, including the tricky cases."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from retroact.envs.qa_metrics import contains_answer, exact_match, f1_score, normalize_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Beatles", "beatles"),
        ("  a  Tale of   Two Cities ", "tale of two cities"),
        ("An apple, the pear & a plum!", "apple pear plum"),
        ("Theatre", "theatre"),  # "the" only as a whole word
        ("U.S.A.", "usa"),
        ("rock'n'roll", "rocknroll"),
        ("Gesellschaft mit beschränkter Haftung", "gesellschaft mit beschränkter haftung"),
        ("ÉCOLE", "école"),  # unicode letters are lower-cased and kept
        ("“Now and Then” (1995)", "“now and then” 1995"),  # official: only ASCII punctuation goes
        ("1,000", "1000"),
        ("", ""),
        ("the", ""),
        ("!!!", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("pred", "gold", "f1"),
    [
        ("The Beatles", "beatles", 1.0),
        ("Super Bowl XLVIII", "Super Bowl XLVIII.", 1.0),
        ("Bowl XLVIII", "Super Bowl XLVIII", 0.8),  # p = 1, r = 2/3
        ("Super Bowl XLVIII in 2014", "Super Bowl XLVIII", 0.75),  # p = 3/5, r = 1
        ("Paris", "London", 0.0),
        ("new new york", "new york", 0.8),  # counts are clipped: p = 2/3, r = 1
        ("yes", "yes", 1.0),
        ("Yes.", "yes", 1.0),
        ("yes", "no", 0.0),
        ("yes it is", "yes", 0.0),  # gold is special: only an exact match scores
        ("no", "no way", 0.0),  # prediction is special and differs
        ("noanswer", "no answer", 0.0),
        ("", "Paris", 0.0),
        ("", "", 0.0),  # the official script gives two empty answers F1 0 (but EM 1)
        ("the", "a", 0.0),
    ],
)
def test_f1_score(pred: str, gold: str, f1: float) -> None:
    assert f1_score(pred, gold) == pytest.approx(f1)


@pytest.mark.parametrize(
    ("pred", "gold", "em"),
    [
        ("the Cold War", "Cold War", True),
        ("cold-war", "coldwar", True),
        ("Cold War (1947–91)", "the Cold War (1947–91)", True),
        ("1947-91", "1947–91", False),  # en dash is not ASCII punctuation
        ("", "", True),
        ("Paris", "paris france", False),
        ("yes", "Yes", True),
    ],
)
def test_exact_match(pred: str, gold: str, em: bool) -> None:
    assert exact_match(pred, gold) is em


def test_contains_answer_is_whole_token() -> None:
    assert contains_answer("I think it is the Selm river", "Selm")
    assert not contains_answer("Selmark is a town", "Selm")
    assert contains_answer("answered 'New York City'", "new york")
    assert not contains_answer("I did not know", "no")
    assert not contains_answer("anything at all", "the")  # normalises to nothing


@given(st.text(max_size=40), st.text(max_size=40))
def test_f1_properties(a: str, b: str) -> None:
    f = f1_score(a, b)
    assert 0.0 <= f <= 1.0
    assert f == pytest.approx(f1_score(b, a))  # F1 is symmetric
    if exact_match(a, b) and normalize_answer(a):
        assert f == pytest.approx(1.0)
    assert normalize_answer(normalize_answer(a)) == normalize_answer(a)
