"""Scripted oracle experts for HotpotQA-format tasks (real and synthetic).

The planner reads the task's supporting facts (privileged data an oracle may use) to search the
right titles in a sensible order, looks up supporting sentences that a Search does not show, and
finishes with the gold answer. With probability ``noise``, a trial that starts with an empty
memory goes wrong on purpose (a distractor title, or a guess after one paragraph), seeded by
task id and trial so runs repeat exactly. The reflector reads the failed trial, names the
mistake and the better plan, and never writes the gold answer, so the planner's memory stays
free of it; with a reflection in memory the planner follows the full plan.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from retroact.envs.base import Task
from retroact.envs.hotpotqa import MAX_SENTENCES, MAX_STEPS, format_action, parse_action
from retroact.envs.hotpotqa_data import Paragraph, paragraphs
from retroact.envs.qa_metrics import (
    SPECIAL_ANSWERS,
    contains_answer,
    exact_match,
    find_tokens,
    normalize_answer,
)
from retroact.models.base import PlannerView, ReflectorView
from retroact.models.scripted import ScriptedPolicy

NOISE_MODES = ("wrong_title", "early_guess")
_WORD = re.compile(r"[A-Za-z][A-Za-z-]{3,}")


@dataclass(frozen=True)
class Step:
    thought: str
    action: str
    arg: str

    def line(self) -> str:
        return format_action(self.thought, self.action, self.arg)


_DISAMBIGUATION = re.compile(r"\s*\([^)]*\)$")


def _position(title: str, text: str) -> int | None:
    """Where ``title``, without a trailing "(disambiguation)", occurs in ``text`` (normalised tokens)."""
    return find_tokens(text, _DISAMBIGUATION.sub("", title))


def hop_order(payload: dict[str, Any]) -> list[str]:
    """Supporting titles in reading order.

    A bridge question is read from the paragraph that mentions the other (the bridge entity is
    the second paragraph's title); otherwise titles go in the order the question names them.
    """
    titles = list(dict.fromkeys(t for t, _ in payload["supporting_facts"]))
    if len(titles) == 2 and payload.get("type") != "comparison":
        texts = {p.title: p.text for p in paragraphs(payload)}
        a, b = titles
        a_to_b, b_to_a = _position(b, texts[a]) is not None, _position(a, texts[b]) is not None
        if a_to_b != b_to_a:
            return [a, b] if a_to_b else [b, a]

    def in_question(title: str) -> int:
        pos = _position(title, payload["question"])
        return len(payload["question"]) if pos is None else pos

    return sorted(titles, key=lambda t: (in_question(t), titles.index(t)))


def lookup_keyword(para: Paragraph, index: int) -> str | None:
    """A word whose first Lookup hit in ``para`` is sentence ``index``, if there is one."""
    for word in _WORD.findall(para.sentences[index]):
        hits = para.sentences_with(word)
        if hits and hits[0] == index:
            return word
    return None


def _plan(task: Task, max_sentences: int, max_steps: int) -> tuple[Step, ...]:
    payload = task.payload
    order = hop_order(payload)
    by_title = {p.title: p for p in paragraphs(payload)}
    comparison = payload.get("type") == "comparison"
    searches: list[tuple[Step, list[Step]]] = []
    for n, title in enumerate(order):
        if n == 0:
            thought = (f"I need to compare {' and '.join(order)}; I will start with {title}." if comparison
                       else f"The question turns on {title}, so I will read about it first.")
        elif comparison:
            thought = f"Now I need the same detail about {title}."
        else:
            thought = f"{order[n - 1]} leads to {title}, so I need to read about {title} next."
        lookups = []
        for index in sorted({i for t, i in payload["supporting_facts"] if t == title}):
            word = lookup_keyword(by_title[title], index) if index >= max_sentences else None
            if word:
                why = f"The detail I need is further down; I will look up '{word}'."
                lookups.append(Step(why, "lookup", word))
        searches.append((Step(thought, "search", title), lookups))
    # Lookups are optional for an oracle that knows the answer: drop them before exceeding the step budget.
    while sum(1 + len(lk) for _, lk in searches) + 1 > max_steps and any(lk for _, lk in searches):
        next(lk for _, lk in reversed(searches) if lk).pop()
    answer = payload["answer"]
    final = (f"Comparing the two, the answer is {answer}." if comparison
             else f"Putting the paragraphs together, the answer is {answer}.")
    steps = [s for search, lookups in searches for s in (search, *lookups)]
    return (*steps, Step(final, "finish", answer))


def _wrong_answer(task: Task, exclude: str | None = None) -> str:
    """A plausible answer that is not the gold one (EM false)."""
    gold = task.payload["answer"]
    if normalize_answer(gold) in SPECIAL_ANSWERS:
        return "no" if normalize_answer(gold) == "yes" else "yes"
    order = hop_order(task.payload)
    others = [p.title for p in paragraphs(task.payload) if p.title not in order]
    for cand in ([exclude] if exclude else []) + order + others:
        if cand and not exact_match(cand, gold) and not contains_answer(cand, gold):
            return cand
    return "unknown"


def _noisy_plan(task: Task, mode: str, rng: random.Random) -> tuple[Step, ...]:
    order = hop_order(task.payload)
    distractors = [p.title for p in paragraphs(task.payload) if p.title not in order]
    if mode == "wrong_title" and distractors:
        title = rng.choice(distractors)
        guess = _wrong_answer(task, title)
        return (Step(f"The question seems to be about {title}; I will read about it.", "search", title),
                Step(f"This paragraph should be enough; I think the answer is {guess}.", "finish", guess))
    guess = _wrong_answer(task, order[0])
    return (Step(f"The question turns on {order[0]}, so I will read about it first.", "search", order[0]),
            Step(f"I can answer already: the answer is {guess}.", "finish", guess))


class OraclePlanner:
    """The planner's policy function; see the module docstring."""

    def __init__(self, noise: float = 0.3, seed: int = 0, max_sentences: int = MAX_SENTENCES,
                 max_steps: int = MAX_STEPS) -> None:
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {noise}")
        self.noise, self.seed, self.max_sentences, self.max_steps = noise, seed, max_sentences, max_steps

    def noise_mode(self, task: Task, trial: int) -> str | None:
        """The deliberate mistake of this (task, trial) when the memory is empty, or None."""
        rng = random.Random(f"{self.seed}/{task.id}/{trial}")
        return rng.choice(NOISE_MODES) if rng.random() < self.noise else None

    def steps(self, task: Task, trial: int, memory: tuple[str, ...]) -> tuple[Step, ...]:
        mode = None if memory else self.noise_mode(task, trial)
        if mode is None:
            return _plan(task, self.max_sentences, self.max_steps)
        return _noisy_plan(task, mode, random.Random(f"{self.seed}/{task.id}/{trial}/{mode}"))

    def __call__(self, view: PlannerView | ReflectorView) -> str:
        assert isinstance(view, PlannerView)
        steps = self.steps(view.task, view.trial, view.memory)
        n = len(view.history)
        step = steps[n] if n < len(steps) else steps[-1]
        if n == 0 and view.memory:
            step = Step(f"Following my earlier reflection, I will read the paragraphs in order, starting "
                        f"with {step.arg}.", step.action, step.arg)
        return step.line()


def _join(titles: list[str]) -> str:
    return titles[0] if len(titles) == 1 else ", ".join(titles[:-1]) + " and " + titles[-1]


def reflect(view: PlannerView | ReflectorView) -> str:
    """A one-line reflection on a failed trial: the mistake and the plan, never the gold answer."""
    assert isinstance(view, ReflectorView)
    payload = view.task.payload
    gold, order = payload["answer"], hop_order(payload)
    actions = [a for a in (parse_action(line) for line, _ in view.history) if a is not None]
    searched = [arg for name, arg in actions if name == "search"]
    answers = [arg for name, arg in actions if name == "finish"]
    read = [t for t in order if any(normalize_answer(s) == normalize_answer(t) for s in searched)]
    off = [s for s in searched if not any(normalize_answer(s) == normalize_answer(t) for t in order)]

    if not answers:
        mistake = "I ran out of steps without giving an answer"
    elif not read:
        mistake = f"I answered {answers[-1]!r} without reading the paragraphs the question depends on"
    elif len(read) < len(order):
        mistake = f"I answered {answers[-1]!r} after reading only {_join(read)}"
    else:
        mistake = f"I answered {answers[-1]!r} although I had read the right paragraphs, so I misread them"
    if off:
        mistake += f", and I spent steps on {_join(off)}, which is not what the question asks about"
    bridge = payload.get("type") != "comparison"
    plans = [
        f"Next time I will search {_join(order)} in that order and answer only after reading "
        f"{'both' if len(order) == 2 else 'all of them'}."
        if bridge else f"Next time I will search {_join(order)} and compare them before answering.",
        # Shorter plans for when a title itself would give the answer away.
        f"Next time I will search {order[0]} first, then follow the entity it points to, and answer only "
        "after reading both paragraphs." if bridge else "",
        "Next time I will search each entity the question depends on, follow the link between them, and "
        "answer only from what the paragraphs say." if bridge else
        "Next time I will search both entities the question names and compare them before answering.",
    ]
    candidates = [f"{m}. {p}" for m in (mistake, "My previous attempt failed") for p in plans if p]
    for text in candidates:
        if not contains_answer(text, gold):
            return text
    return "Read every paragraph the question needs before answering."


def make_experts(noise: float = 0.3, seed: int = 0, max_sentences: int = MAX_SENTENCES,
                 max_steps: int = MAX_STEPS) -> tuple[ScriptedPolicy, ScriptedPolicy]:
    """``(planner, reflector)`` scripted oracle experts for HotpotQA-format envs."""
    planner = OraclePlanner(noise, seed, max_sentences, max_steps)
    return (ScriptedPolicy("expert:hotpotqa-oracle", planner),
            ScriptedPolicy("expert:hotpotqa-reflect", reflect))
