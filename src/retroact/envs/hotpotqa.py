"""HotpotQA as a text env: Search/Lookup/Finish over local paragraphs, rewarded by answer F1.

One planner step is one line, ``Thought: <reasoning> Action: <action>``; the env reads the action
after the last ``Action:`` (or anywhere in the line when that marker is missing), case- and
spacing-tolerant. Every observation is one line starting with ``Observation: ``. Search runs over
the question's own context paragraphs (``corpus="task"``, the distractor setting) or over every
paragraph of the loaded files (``corpus="all"``); nothing reaches Wikipedia.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from retroact.envs.base import EnvSpec, PromptStyle, StepResult, Task, clean_action, seeded_sample
from retroact.envs.hotpotqa_data import Paragraph, all_paragraphs, load_split, paragraphs, split_files
from retroact.envs.qa_metrics import exact_match, f1_score, normalize_answer
from retroact.envs.retrievers import RETRIEVERS, Retriever, dense_model_dir, make_retriever

if TYPE_CHECKING:
    from retroact.models.base import Policy

MAX_STEPS = 5
MAX_SENTENCES = 5
"""Sentences a Search shows; the rest of a long paragraph is reachable with Lookup."""
OBS_PREFIX = "Observation: "
VALID_ACTIONS = "Search[entity], Lookup[keyword], Finish[answer]"
CORRECT = "Answer is correct."
INCORRECT = "Answer is incorrect."

_MARKER = re.compile(r"action\s*:", re.IGNORECASE)
_ACTION = re.compile(r"\b(search|lookup|finish)\s*\[", re.IGNORECASE)


def parse_action(line: str) -> tuple[str, str] | None:
    """``(name, argument)`` with name lower-cased, or None when the line holds no known action.

    A missing closing bracket (a cut-off generation) is tolerated; quotes around the argument go.
    """
    line = clean_action(line)
    markers = list(_MARKER.finditer(line))
    part = line[markers[-1].end():] if markers else line
    match = _ACTION.search(part)
    if match is None:
        return None
    rest = part[match.end():]
    arg = rest.split("]", 1)[0].strip()
    if len(arg) >= 2 and arg[0] == arg[-1] and arg[0] in "\"'":
        arg = arg[1:-1].strip()
    return match.group(1).lower(), arg


def format_action(thought: str, name: str, arg: str) -> str:
    """One planner line in this env's format (used by experts and importers)."""
    return f"Thought: {thought} Action: {name.capitalize()}[{arg}]"


def question_text(question: str) -> str:
    """The first observation of a trial."""
    return f"Question: {' '.join(question.split())}\n"


def observation(text: str) -> str:
    """One observation line: the prefix, the text on a single line, a newline."""
    return OBS_PREFIX + " ".join(text.split()) + "\n"


class Corpus:
    """Paragraphs with an exact-title index and a retriever over ``title: text``."""

    def __init__(self, paras: Sequence[Paragraph], retriever: str = "bm25",
                 model_dir: str | Path | None = None, min_score: float | None = None) -> None:
        self.paragraphs = list(paras)
        self._exact = {p.title.casefold(): i for i, p in reversed(list(enumerate(self.paragraphs)))}
        self._loose = {normalize_answer(p.title): i for i, p in reversed(list(enumerate(self.paragraphs)))}
        self.retriever: Retriever = make_retriever(
            retriever, [f"{p.title}: {p.text}" for p in self.paragraphs], model_dir, min_score)

    def by_title(self, query: str) -> Paragraph | None:
        """The paragraph titled ``query`` (case-insensitive, then after answer normalisation)."""
        i = self._exact.get(" ".join(query.split()).casefold())
        if i is None and normalize_answer(query):
            i = self._loose.get(normalize_answer(query))
        return None if i is None else self.paragraphs[i]

    def search(self, query: str) -> Paragraph | list[str]:
        """The best paragraph, or up to 5 similar titles when nothing matches well."""
        found = self.by_title(query)
        if found is not None:
            return found
        hits = self.retriever.search(query, k=5)
        if hits and hits[0][1] >= self.retriever.min_score:
            return self.paragraphs[hits[0][0]]
        titles = [p.title for p in self.paragraphs]
        return difflib.get_close_matches(query, titles, n=5, cutoff=0.0)


@lru_cache(maxsize=2)
def _files_corpus(files: tuple[Path, ...], retriever: str, model_dir: str | None,
                  min_score: float | None) -> Corpus:
    return Corpus(all_paragraphs(files), retriever, model_dir, min_score)


class HotpotQAEnv:
    """One trial at a time of a HotpotQA-format task; see the module docstring for the actions."""

    def __init__(self, corpus_for: Callable[[Task], Corpus], max_steps: int = MAX_STEPS,
                 max_sentences: int = MAX_SENTENCES) -> None:
        if max_steps < 1 or max_sentences < 1:
            raise ValueError("max_steps and max_sentences must be at least 1")
        self._corpus_for = corpus_for
        self.max_steps = max_steps
        self.max_sentences = max_sentences
        self._task: Task | None = None

    def reset(self, task: Task) -> str:
        for key in ("question", "answer", "context"):
            if key not in task.payload:
                raise ValueError(f"hotpotqa task {task.id!r}: payload has no {key!r}")
        self._task = task
        self._corpus = self._corpus_for(task)
        self._steps = 0
        self._final: StepResult | None = None
        self._page: Paragraph | None = None
        self._lookup: tuple[str, list[int], int] | None = None  # keyword, matching sentences, next index
        return question_text(task.payload["question"])

    def step(self, action: str) -> StepResult:
        if self._task is None:
            raise RuntimeError("step() before reset()")
        if self._final is not None:
            return StepResult(observation("The episode is over."), self._final.reward, True,
                              {**self._final.info, "valid": False})
        self._steps += 1
        parsed = parse_action(action)
        if parsed is None:
            result = StepResult(observation(f"Invalid action. Valid actions: {VALID_ACTIONS}."),
                                info={"valid": False})
        elif not parsed[1]:
            name = parsed[0].capitalize()
            result = StepResult(observation(f"{name}[] needs an argument. Valid actions: {VALID_ACTIONS}."),
                                info={"valid": False})
        else:
            name, arg = parsed
            handler = {"search": self._search, "lookup": self._lookup_step, "finish": self._finish}[name]
            result = handler(arg)
        if not result.done and self._steps >= self.max_steps:
            result = StepResult(result.observation.rstrip("\n") + " Out of steps: no answer was given.\n",
                                0.0, True, {**result.info, "success": False, "f1": 0.0, "em": False})
        if result.done:
            self._final = result
        return result

    def _search(self, query: str) -> StepResult:
        found = self._corpus.search(query)
        if isinstance(found, list):
            self._page = None
            return StepResult(observation(f"Could not find [{query}]. Similar: {'; '.join(found)}."),
                              info={"valid": True, "action": "search"})
        self._page, self._lookup = found, None
        shown = " ".join(s.strip() for s in found.sentences[: self.max_sentences])
        more = len(found.sentences) - self.max_sentences
        tail = f" ({more} more sentences: use Lookup[keyword] to read them.)" if more > 0 else ""
        return StepResult(observation(f"[{found.title}] {shown}{tail}"),
                          info={"valid": True, "action": "search", "title": found.title})

    def _lookup_step(self, keyword: str) -> StepResult:
        info: dict[str, object] = {"valid": True, "action": "lookup"}
        if self._page is None:
            return StepResult(observation("There is no paragraph to look in: use Search first."), info=info)
        if self._lookup is None or self._lookup[0] != keyword.casefold():
            self._lookup = (keyword.casefold(), self._page.sentences_with(keyword), 0)
        key, hits, nxt = self._lookup
        if nxt >= len(hits):
            text = f"No more results for [{keyword}] in {self._page.title}."
            return StepResult(observation(text), info=info)
        self._lookup = (key, hits, nxt + 1)
        sentence = self._page.sentences[hits[nxt]].strip()
        return StepResult(observation(f"(Result {nxt + 1} / {len(hits)}) {sentence}"), info=info)

    def _finish(self, answer: str) -> StepResult:
        assert self._task is not None
        gold = self._task.payload["answer"]
        f1, em = f1_score(answer, gold), exact_match(answer, gold)
        return StepResult(observation(CORRECT if em else INCORRECT), f1, True,
                          {"valid": True, "action": "finish", "success": em, "f1": f1, "em": em,
                           "answer": answer})


def corpus_factory(corpus: str, retriever: str, model_dir: str | Path | None, min_score: float | None,
                   all_corpus: Callable[[], Corpus]) -> Callable[[Task], Corpus]:
    """Per-task corpora (``task``) or one shared corpus (``all``), with options checked up front."""
    if retriever not in RETRIEVERS:
        raise ValueError(f"unknown retriever {retriever!r}; choose one of: {', '.join(RETRIEVERS)}")
    if retriever == "dense":
        dense_model_dir(model_dir)  # fail at make, not at the first reset
    if corpus == "task":
        return lambda task: Corpus(paragraphs(task.payload), retriever, model_dir, min_score)
    if corpus == "all":
        def shared(task: Task) -> Corpus:
            found = all_corpus()
            missing = [t for t, _ in task.payload["context"] if found.by_title(t) is None]
            if missing:
                raise ValueError(f"task {task.id!r}: paragraph {missing[0]!r} is not in the corpus='all' "
                                 "files")
            return found
        return shared
    raise ValueError(f"unknown corpus {corpus!r}; choose 'task' or 'all'")


def make(*, corpus: str = "task", retriever: str = "bm25", model_dir: str | None = None,
         min_score: float | None = None, max_steps: int = MAX_STEPS, max_sentences: int = MAX_SENTENCES,
         train_files: Sequence[str] | None = None, test_files: Sequence[str] | None = None) -> HotpotQAEnv:
    """A HotpotQA env. ``train_files``/``test_files`` choose the ``corpus="all"`` paragraphs
    (default: the split files, see :func:`~retroact.envs.hotpotqa_data.split_files`)."""
    chosen = (*(test_files or split_files("test")), *(train_files or split_files("train")))
    files = tuple(Path(f) for f in chosen)
    factory = corpus_factory(corpus, retriever, model_dir, min_score,
                             lambda: _files_corpus(files, retriever, model_dir, min_score))
    return HotpotQAEnv(factory, max_steps, max_sentences)


def tasks(split: str, n: int | None = None, seed: int = 0) -> list[Task]:
    return seeded_sample(load_split(split), n, seed)


def _experts(**options: object) -> tuple[Policy, Policy]:
    # The expert module builds on this one's action grammar, so it is imported on use.
    from retroact.envs.hotpotqa_expert import make_experts

    return make_experts(**options)  # type: ignore[arg-type]


PLANNER_FEWSHOT = """\
Question: Which river flows through the town where the painter Ilsa Varnholt was born?
Thought: I need Ilsa Varnholt's birthplace first, then the river of that town. \
Action: Search[Ilsa Varnholt]
Observation: [Ilsa Varnholt] Ilsa Varnholt (1871-1940) was a landscape painter born in Korvath. \
She later taught drawing in Vienna.
Thought: She was born in Korvath, so now I need the river that runs through Korvath. Action: Search[Korvath]
Observation: [Korvath] Korvath is a market town on the banks of the Selm. \
It has held a weekly cattle fair since 1350.
Thought: Korvath lies on the Selm, so the answer is the Selm. Action: Finish[Selm]
Observation: Answer is correct.

Question: Which magazine was started earlier, The Lantern Review or Fieldnotes Quarterly?
Thought: I need the founding year of each magazine; I will start with The Lantern Review. \
Action: Search[The Lantern Review]
Observation: [The Lantern Review] The Lantern Review is a literary magazine from Dunmore. \
It appears four times a year. It prints fiction, essays and poems. Several of its editors were poets. \
It awards a yearly prize for a first book. (2 more sentences: use Lookup[keyword] to read them.)
Thought: The founding year is not among the sentences shown, so I will look for it. Action: Lookup[founded]
Observation: (Result 1 / 1) The magazine was founded in 1952 by a group of schoolteachers.
Thought: The Lantern Review dates from 1952; now I need Fieldnotes Quarterly. \
Action: Search[Fieldnotes Quarterly]
Observation: [Fieldnotes Quarterly] Fieldnotes Quarterly is a nature magazine founded in 1968. \
It covers birdwatching and conservation.
Thought: 1952 comes before 1968, so The Lantern Review was started earlier. Action: Finish[The Lantern Review]
Observation: Answer is correct.
"""
"""Planner exemplars for LLM experts (invented entities, this env's exact line format)."""

REFLECTOR_FEWSHOT = """\
Failed trial:
Question: In which year did the band that recorded "Glass Harbour" break up?
Thought: I should find the band behind "Glass Harbour". Action: Search[Glass Harbour]
Observation: [Glass Harbour] "Glass Harbour" is a 1994 single by the rock band The Pale Engines. \
It reached number 12 in the charts.
Thought: The song is from 1994, so the answer is 1994. Action: Finish[1994]
Observation: Answer is incorrect.
Reflection: I answered with the year of the single instead of the year the band split up, \
without ever reading about the band. Next time I will search Glass Harbour, then search The Pale Engines \
and look up when they broke up before answering.
"""

PROMPTS = PromptStyle(
    planner_instruction=(
        "Answer the question by reading paragraphs from a small local collection. Work one step per "
        "line, written as 'Thought: <your reasoning> Action: <action>'. The actions are:\n"
        "- Search[entity]: show the paragraph that best matches the entity, or similar titles if none does.\n"
        "- Lookup[keyword]: show the next sentence containing the keyword in the last paragraph shown.\n"
        "- Finish[answer]: give a short final answer and end the episode.\n"
        f"You have at most {MAX_STEPS} steps."
    ),
    reflector_instruction=(
        "The attempt below to answer a question failed: the answer was wrong or the steps ran out. "
        "On one line, say what went wrong and give a concrete plan for the next attempt, such as "
        "which titles to search and in which order."
    ),
    step_prefix="",
    max_action_tokens=128,
    max_reflection_tokens=128,
    fewshot=PLANNER_FEWSHOT,
    reflector_fewshot=REFLECTOR_FEWSHOT,
)

SPEC = EnvSpec(
    name="hotpotqa",
    make=make,
    tasks=tasks,
    experts=_experts,
    prompts=PROMPTS,
    max_steps=MAX_STEPS,
    memory_size=None,
    reflector_sees_memory=False,
)
