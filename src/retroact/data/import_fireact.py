"""Turn FireAct's released GPT-4 HotpotQA trajectories into planner IL records for ``hotpotqa``.

FireAct's file holds 500 successful GPT-4 ReAct episodes on HotpotQA *train* questions, in
Alpaca form (``instruction`` = question, ``output`` = Thought/Action/Observation lines). Their
observations came from a web search engine, not from our local paragraphs, so the episodes
cannot be replayed in our env; each is rewritten into our one-line step format with the exact
prompt the loop gives a zero-shot planner, its observations kept as FireAct recorded them, and
marked with ``source = "import:fireact-gpt4"`` and ``info.observations = "web-search"``.

Questions that are also in our train split are scored against their gold answer (F1 and EM);
the others carry FireAct's own verdict (correct). Questions in our test split are never imported.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from retroact.agent import prompts
from retroact.agent.records import OutputSegment, TrajectoryRecord, write_records
from retroact.envs.base import MAX_ACTION_CHARS, Task
from retroact.envs.hotpotqa import (
    CORRECT,
    INCORRECT,
    PROMPTS,
    format_action,
    observation,
    parse_action,
    question_text,
)
from retroact.envs.hotpotqa_data import DATA_DIR, FIREACT_FILE, load_split
from retroact.envs.qa_metrics import exact_match, f1_score
from retroact.paths import data_path

SOURCE = "import:fireact-gpt4"
ENV = "hotpotqa"


@dataclass
class FireActStats:
    episodes: int = 0
    in_test_split: int = 0
    """Skipped: the question is one of our test questions."""
    too_long: int = 0
    """Skipped: a step line longer than the loop accepts (``MAX_ACTION_CHARS``)."""
    matched_train: int = 0
    """Imported and scored against the gold answer of the same train question."""
    wrong_on_gold: int = 0
    """Of those, answers that are not an exact match of our gold answer (kept, with their reward)."""
    kept: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


def parse_output(text: str, where: str) -> list[tuple[str, str, str, str]]:
    """``(thought, action, argument, observation)`` per step of a FireAct ``output``."""
    steps: list[tuple[str, str, str, str]] = []
    thought, action = "", None
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        head, _, body = line.partition(":")
        head = head.strip().lower()
        if head == "thought":
            thought = body.strip()
        elif head == "action":
            action = parse_action(line)
            if action is None:
                raise ValueError(f"{where}: line {n}: not a Search/Lookup/Finish action: {line[:80]!r}")
        elif head == "observation":
            if action is None:
                raise ValueError(f"{where}: line {n}: observation without an action")
            steps.append((thought, action[0], action[1], body.strip()))
            thought, action = "", None
        else:
            raise ValueError(f"{where}: line {n}: expected Thought/Action/Observation, got {line[:80]!r}")
    if not steps or steps[-1][1] != "finish":
        raise ValueError(f"{where}: the episode does not end with a Finish action")
    return steps


def _key(question: str) -> str:
    """Questions are matched across files up to case and spacing."""
    return " ".join(question.split()).casefold()


def _task_id(question: str) -> str:
    return "fireact-" + hashlib.sha1(question.encode("utf-8")).hexdigest()[:12]


def import_fireact(
    path: str | Path | None = None, *, train: Sequence[Task] | None = None, test: Sequence[Task] | None = None
) -> tuple[list[TrajectoryRecord], FireActStats]:
    """Planner records (trial 0, zero-shot prompt) of FireAct's episodes, and the counts.

    ``train``/``test`` default to our hotpotqa splits: train questions give gold answers and ids,
    test questions are excluded.
    """
    path = Path(path) if path else data_path(f"{DATA_DIR}/{FIREACT_FILE}")
    try:
        episodes = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read FireAct trajectories: {err}") from None
    if not isinstance(episodes, list):
        raise ValueError(f"{path}: expected a JSON list of Alpaca records")
    gold = {_key(t.payload["question"]): t for t in (train if train is not None else load_split("train"))}
    excluded = {_key(t.payload["question"]) for t in (test if test is not None else load_split("test"))}
    stats = FireActStats(episodes=len(episodes))
    records: list[TrajectoryRecord] = []
    for i, ep in enumerate(episodes):
        where = f"{path}: record {i}"
        if not (isinstance(ep, dict) and all(isinstance(ep.get(k), str) for k in ("instruction", "output"))):
            raise ValueError(f"{where}: expected an object with string fields 'instruction' and 'output'")
        question = " ".join(ep["instruction"].split())
        if _key(question) in excluded:
            stats.in_test_split += 1
            continue
        steps = parse_output(ep["output"], where)
        lines = [format_action(t, a, x) if t else f"Action: {a.capitalize()}[{x}]" for t, a, x, _ in steps]
        if any(len(line) > MAX_ACTION_CHARS for line in lines):
            stats.too_long += 1
            continue
        task = gold.get(_key(question))
        answer = steps[-1][2]
        if task is not None:
            reward = f1_score(answer, task.payload["answer"])
            success = exact_match(answer, task.payload["answer"])
            stats.matched_train += 1
            stats.wrong_on_gold += not success
        else:
            reward, success = 1.0, True  # FireAct kept only episodes its evaluator judged correct
        segments: list[OutputSegment] = []
        for n, (line, (_, _, _, obs)) in enumerate(zip(lines, steps, strict=True)):
            if n == len(steps) - 1:  # FireAct's "Episode finished, reward = True" becomes our verdict
                obs = CORRECT if success else INCORRECT
            segments += [OutputSegment(kind="model", text=line + "\n"),
                         OutputSegment(kind="env", text=observation(obs))]
        first = question_text(question)
        records.append(TrajectoryRecord(
            env=ENV, split="train", task_id=task.id if task else _task_id(question), role="planner", trial=0,
            source=SOURCE, prompt=prompts.planner_prompt(PROMPTS, (), first, fewshot=False),
            segments=segments, reward=reward, success=success, n_steps=len(steps),
            info={"memory": [], "first_observation": first, "observations": "web-search",
                  "gold_checked": task is not None, "fireact_index": i},
        ))
    stats.kept = len(records)
    return records, stats


def import_to_jsonl(out: str | Path, path: str | Path | None = None) -> FireActStats:
    """Write the imported planner records to ``out`` (JSONL) and return the counts."""
    records, stats = import_fireact(path)
    write_records(out, records)
    return stats
