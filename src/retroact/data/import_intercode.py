"""Turn InterCode's released GPT-4 SQL episodes (MySQL) into planner IL records for ``intercode_sql``.

Each episode that reached reward 1 on MySQL is cut after its best action, its MySQL-only
commands are rewritten for SQLite (``SHOW TABLES``, ``DESCRIBE t``, ``SHOW COLUMNS FROM t``, ...)
or dropped (``USE db``, ``SHOW DATABASES``, writes, non-SQL text), and ``submit`` is appended.
The episode is then replayed through the real loop and env, so every observation is what our
SQLite env shows and every record has exactly the loop's format; only episodes that still
score 1 are kept. :class:`ImportStats` counts every conversion, drop and rejection.

By default only training-split episodes are imported (tasks 0–99 are the test split).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from retroact.agent.loop import LoopConfig, run_trials
from retroact.agent.records import TrajectoryRecord, write_records
from retroact.envs import get_spec
from retroact.envs.base import MAX_ACTION_CHARS, Task
from retroact.envs.intercode_sql_data import DATA_DIR, load_dataset
from retroact.models.base import PlannerView, ReflectorView
from retroact.models.scripted import ScriptedPolicy
from retroact.paths import data_path

TRAJECTORY_FILE = f"{DATA_DIR}/trajectories/ic_sql_multiturn_gpt-4_10_turns.json"
SOURCE = "import:intercode-gpt4"
ENV = "intercode_sql"

_NAME = r"`?([A-Za-z_]\w*)`?"
_REWRITES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    (
        "show_tables",
        re.compile(r"show\s+(?:full\s+)?tables(?:\s+(?:from|in)\s+\S+)?", re.I),
        "SELECT name FROM sqlite_master WHERE type = 'table'",
    ),
    ("describe", re.compile(rf"(?:describe|desc|explain)\s+{_NAME}", re.I), r"PRAGMA table_info(\1)"),
    (
        "show_columns",
        re.compile(
            rf"show\s+(?:full\s+)?(?:columns|fields)\s+(?:from|in)\s+{_NAME}(?:\s+(?:from|in)\s+\S+)?", re.I
        ),
        r"PRAGMA table_info(\1)",
    ),
    (
        "show_create",
        re.compile(rf"show\s+create\s+table\s+{_NAME}", re.I),
        r"SELECT sql FROM sqlite_master WHERE name = '\1'",
    ),
    (
        "show_index",
        re.compile(rf"show\s+(?:index|indexes|keys)\s+(?:from|in)\s+{_NAME}", re.I),
        r"PRAGMA index_list(\1)",
    ),
)
_DROPS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("use_db", re.compile(r"use\s+\S+", re.I)),
    ("show_other", re.compile(r"show\b.*", re.I | re.S)),
    ("select_database", re.compile(r"select\s+database\s*\(\s*\)", re.I)),
    (
        "write",
        re.compile(
            r"(?:insert|update|delete|replace|alter|create|drop|truncate|rename|grant|set)\b.*", re.I | re.S
        ),
    ),
)
_SQL_START = re.compile(r"(?:select|with|pragma|values)\b|\(", re.I)


def convert_action(action: str) -> tuple[str | None, str]:
    """``(SQLite statement or None when dropped, rule)``; rule is ``kept`` for SQL that runs as is."""
    text = " ".join(action.split()).rstrip(";").strip()
    for rule, pattern, replacement in _REWRITES:
        if pattern.fullmatch(text):
            return pattern.sub(replacement, text), rule
    for rule, pattern in _DROPS:
        if pattern.fullmatch(text):
            return None, rule
    if not _SQL_START.match(text):
        return None, "not_sql"
    return text, "kept"


@dataclass
class ImportStats:
    episodes: int = 0
    """Episodes in the file."""
    other_split: int = 0
    """Skipped: the task is in a split that was not asked for."""
    unsolved_on_mysql: int = 0
    """Skipped: never reached reward 1 on MySQL."""
    actions: Counter[str] = field(default_factory=Counter)
    """Actions up to the best one, by rule: kept, show_tables, describe, ..., use_db, write, repeat."""
    too_many_steps: int = 0
    """Rejected: more actions (submit included) than the env's step limit."""
    line_too_long: int = 0
    """Rejected: an action line longer than the loop accepts (``MAX_ACTION_CHARS``)."""
    replayed: int = 0
    not_reproduced: int = 0
    """Rejected: the replay on SQLite did not score 1 (MySQL/SQLite differences)."""
    kept: int = 0

    def as_dict(self) -> dict[str, object]:
        out = dict(vars(self))
        out["actions"] = dict(sorted(self.actions.items()))
        return out


def _episode_lines(actions: Sequence[str], stats: ImportStats) -> list[str]:
    lines: list[str] = []
    for action in actions:
        sql, rule = convert_action(action)
        if sql is None:
            stats.actions[rule] += 1
            continue
        line = f"Action: execute[{sql}]"
        if lines and lines[-1] == line:  # the loop would stop the trial on a repeated action
            stats.actions["repeat"] += 1
            continue
        stats.actions[rule] += 1
        lines.append(line)
    return [*lines, "Action: submit"]


def import_gpt4_trajectories(
    path: str | Path | None = None, *, splits: Sequence[str] = ("train",), tasks: Sequence[Task] | None = None
) -> tuple[list[TrajectoryRecord], ImportStats]:
    """Planner records of the reproducible successful GPT-4 episodes, and the counts.

    ``tasks`` defaults to the shipped InterCode tasks; episode keys are task indices.
    """
    path = Path(path) if path else data_path(TRAJECTORY_FILE)
    try:
        episodes = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read trajectories: {err}") from None
    if not isinstance(episodes, dict):
        raise ValueError(f"{path}: expected an object keyed by task index, got {type(episodes).__name__}")
    by_id = {t.id: t for t in (tasks if tasks is not None else load_dataset().tasks)}
    spec = get_spec(ENV)
    stats = ImportStats(episodes=len(episodes))
    plans: dict[str, list[str]] = {}
    for key, ep in episodes.items():
        where = f"{path}: episode {key!r}"
        try:
            history, summary = ep["turn_history"], ep["summary"]
            actions, best, reward = (
                history["actions"],
                int(summary["max_reward_idx"]),
                float(summary["max_reward"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: missing or bad field {err}") from None
        task = by_id.get(str(key))
        if task is None:
            raise ValueError(f"{where}: no task with id {key!r} in the task file")
        if " ".join(str(ep.get("query", "")).split()) != task.payload["question"]:
            raise ValueError(f"{where}: its question does not match task {key}'s question")
        if task.split not in splits:
            stats.other_split += 1
            continue
        if reward < 1.0:
            stats.unsolved_on_mysql += 1
            continue
        lines = _episode_lines(actions[: best + 1], stats)
        if len(lines) > spec.max_steps:
            stats.too_many_steps += 1
            continue
        if any(len(line) > MAX_ACTION_CHARS for line in lines):
            stats.line_too_long += 1
            continue
        plans[task.id] = lines
    replay = [by_id[k] for k in plans]
    stats.replayed = len(replay)
    if not replay:
        return [], stats

    def act(view: PlannerView | ReflectorView) -> str:
        lines = plans[view.task.id]
        return lines[min(len(view.history), len(lines) - 1)]

    result = run_trials(spec, replay, ScriptedPolicy(SOURCE, act), None, LoopConfig(trials=1, reflect=False))
    records = [r for r in result.records if r.role == "planner" and r.success]
    stats.kept = len(records)
    stats.not_reproduced = stats.replayed - stats.kept
    return records, stats


def import_to_jsonl(
    out: str | Path, path: str | Path | None = None, *, splits: Sequence[str] = ("train",)
) -> ImportStats:
    """Write the imported planner records to ``out`` (JSONL) and return the counts."""
    records, stats = import_gpt4_trajectories(path, splits=splits)
    write_records(out, records)
    return stats
