"""HotpotQA answer metrics: the official normalisation, token F1 and exact match.

These follow the definitions of the HotpotQA evaluation script (itself SQuAD's): lowercase,
drop ASCII punctuation, drop the articles a/an/the, collapse whitespace; F1 over the remaining
tokens; the special answers yes/no/noanswer score F1 only on an exact match.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
SPECIAL_ANSWERS = frozenset({"yes", "no", "noanswer"})


def normalize_answer(text: str) -> str:
    """Lowercase, strip ASCII punctuation and articles, collapse whitespace (official order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def f1_score(prediction: str, gold: str) -> float:
    """Token F1 between normalised answers; yes/no/noanswer must match exactly to score."""
    pred_norm, gold_norm = normalize_answer(prediction), normalize_answer(gold)
    if (pred_norm in SPECIAL_ANSWERS or gold_norm in SPECIAL_ANSWERS) and pred_norm != gold_norm:
        return 0.0
    pred_tokens, gold_tokens = pred_norm.split(), gold_norm.split()
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        # Also covers two empty answers: the official script scores them 0 F1 (but 1 EM).
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


def find_tokens(text: str, phrase: str) -> int | None:
    """Token index where normalised ``phrase`` starts in normalised ``text`` (None if absent or empty)."""
    needle = normalize_answer(phrase).split()
    if not needle:
        return None
    tokens = normalize_answer(text).split()
    n = len(needle)
    return next((i for i in range(len(tokens) - n + 1) if tokens[i : i + n] == needle), None)


def contains_answer(text: str, gold: str) -> bool:
    """Whether ``gold`` appears in ``text`` as a whole-token run after normalisation.

    Used to keep gold answers out of memories; an answer that normalises to nothing never matches.
    """
    return find_tokens(text, gold) is not None
