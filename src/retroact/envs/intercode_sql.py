"""InterCode-SQL on SQLite: answer a question about a database with ``execute[<SQL>]`` and ``submit``.

One planner step is one line, e.g. ``Thought: I need the tables. Action: execute[SELECT ...]``.
Parsing is tolerant: the action is what follows ``Action:`` when present, case and spacing do
not matter, a missing closing bracket is accepted. Anything else gets an observation that lists
the valid actions. Observations are the rows as a Python-style list (at most ``max_rows_shown``
rows and ``max_obs_chars`` characters, then ``[N rows]``), ``[]`` for no rows, or
``Error: <SQLite message>``.

``submit`` ends the trial; the answer is the result of the latest ``execute`` (an error, or no
execute at all, scores 0) and the reward is InterCode's (:mod:`retroact.envs.sql_reward`).
A trial that ends without ``submit`` (step limit, repeated action) scores 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from retroact.envs.base import EnvSpec, PromptStyle, StepResult, Task
from retroact.envs.intercode_sql_data import file_db_key, gold_result, list_tasks
from retroact.envs.intercode_sql_expert import FEWSHOT, MAX_STEPS, REFLECTION_FEWSHOT, make_experts
from retroact.envs.sql_reward import intercode_reward, row_key
from retroact.envs.sql_sandbox import QueryResult, SandboxLimits, SandboxPool, SqlSandbox

INVALID_ACTION = (
    "Invalid action. Valid actions: execute[<one SQLite query>] to run a query, "
    "or submit to answer with the result of your latest query."
)
SUBMITTED = "Submitted."
TRIAL_OVER = "The trial is over; no more actions are taken."

_ACTION_MARK = re.compile(r"\baction\s*:\s*(?=execute\s*\[|submit\b)", re.I)
_SUBMIT = re.compile(r"submit\s*(?:\[\s*\])?\s*\.?", re.I)
_EXECUTE = re.compile(r"execute\s*\[", re.I)


@dataclass(frozen=True)
class SqlAction:
    kind: str
    """``execute`` or ``submit``."""
    sql: str = ""


def parse_action(text: str) -> SqlAction | None:
    """The action in one model line, or None when there is none."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    mark = _ACTION_MARK.search(line)
    if mark:
        line = line[mark.end() :]
    if _SUBMIT.fullmatch(line):
        return SqlAction("submit")
    start = _EXECUTE.match(line)
    if not start:
        return None
    body = line[start.end() :].rstrip()
    body = body.removesuffix(".").rstrip() if body.endswith("].") else body
    if body.endswith("]"):
        body = body[:-1]
    return SqlAction("execute", body.strip())


def format_result(result: QueryResult, max_rows: int, max_chars: int) -> str:
    """The observation text of one execution (see module doc)."""
    if result.rows is None:
        return f"Error: {result.error}"
    rows = result.rows
    text = repr(rows[:max_rows])
    cut = len(rows) > max_rows or result.truncated
    if len(text) > max_chars:
        text, cut = text[:max_chars] + "...", True
    if cut:
        n = len(rows)
        text += f" [{'more than ' if result.truncated else ''}{n} row{'' if n == 1 else 's'}]"
    return text


PROMPTS = PromptStyle(
    planner_instruction=(
        "Answer a question about a SQLite database by running SQL queries. Write one line per step: "
        "a short thought, then an action, either\n"
        "Thought: <reasoning> Action: execute[<one SQLite query>]\n"
        "or\n"
        "Thought: <reasoning> Action: submit\n"
        "execute runs one read-only statement and shows its rows (long results are cut). submit ends "
        "the task, and your answer is the result of your latest query, so run the query that answers "
        "the question right before you submit. List the tables with "
        "execute[SELECT name FROM sqlite_master WHERE type = 'table'] and the columns of a table with "
        "execute[PRAGMA table_info(<table>)]."
    ),
    reflector_instruction=(
        "You tried to answer a question about a SQLite database and failed: the result you submitted was "
        "wrong, or you never submitted. Read the trial below. In two or three sentences, say what went "
        "wrong (a table, column, condition, join, grouping, sort order or limit) and give a concrete "
        "plan for the next try."
    ),
    step_prefix="> ",
    max_action_tokens=192,
    max_reflection_tokens=128,
    fewshot=FEWSHOT,
    reflector_fewshot=REFLECTION_FEWSHOT,
)


class SqlEnv:
    """The InterCode-SQL interaction on whatever database a subclass names for a task."""

    pool = SandboxPool()
    """Shared by all instances: the loop makes one env per task, and tasks share databases."""

    def __init__(
        self, *, max_rows_shown: int = 25, max_obs_chars: int = 350, limits: SandboxLimits | None = None
    ) -> None:
        self.max_rows_shown = max_rows_shown
        self.max_obs_chars = max_obs_chars
        self.limits = limits or SandboxLimits()
        self._task: Task | None = None
        self._sandbox: SqlSandbox | None = None
        self._db_key = ""
        self._answer: list[str] | None = None
        self._done = True

    def database(self, task: Task) -> tuple[str, Callable[[], SqlSandbox]]:
        """``(content key, opener)`` of the task's database; the key also names it in the gold cache."""
        raise NotImplementedError

    def reset(self, task: Task) -> str:
        key, opener = self.database(task)
        self._sandbox = self.pool.get(f"{key}|{self.limits}", opener)
        self._task, self._db_key = task, key
        self._answer = None
        self._done = False
        return f"Question: {task.payload['question']}"

    def step(self, action: str) -> StepResult:
        if self._done or self._task is None or self._sandbox is None:
            return StepResult(TRIAL_OVER, done=True, info={"valid": False})
        parsed = parse_action(action)
        if parsed is None:
            return StepResult(INVALID_ACTION, info={"valid": False})
        if parsed.kind == "submit":
            return self._submit(self._task, self._sandbox)
        if not parsed.sql:
            self._answer = None
            return StepResult("Error: the query is empty.", info={"valid": True})
        result = self._sandbox.execute(parsed.sql)
        self._answer = None if result.rows is None else [row_key(r) for r in result.rows]
        return StepResult(
            format_result(result, self.max_rows_shown, self.max_obs_chars), info={"valid": True}
        )

    def _submit(self, task: Task, sandbox: SqlSandbox) -> StepResult:
        self._done = True
        gold = gold_result(self._db_key, task.payload["gold"], sandbox)
        info: dict[str, object] = {"valid": True}
        if gold.error is not None:
            info["gold_error"] = gold.error
        reward = 0.0 if gold.error else intercode_reward(self._answer, gold.rows, ordered=gold.ordered)
        info["success"] = reward == 1.0
        return StepResult(SUBMITTED, reward=reward, done=True, info=info)

    def close(self) -> None:
        """Let go of the database (it closes once no env and the pool hold it)."""
        self._sandbox = None
        self._done = True


class InterCodeSqlEnv(SqlEnv):
    """Tasks whose payload names a database file (``db_path``), opened read-only in place."""

    def database(self, task: Task) -> tuple[str, Callable[[], SqlSandbox]]:
        path = task.payload["db_path"]
        return file_db_key(path), lambda: SqlSandbox.open_file(path, self.limits)


def make_env(
    *, max_rows_shown: int = 25, max_obs_chars: int = 350, timeout_s: float = 2.0, max_rows: int = 10_000
) -> InterCodeSqlEnv:
    return InterCodeSqlEnv(
        max_rows_shown=max_rows_shown,
        max_obs_chars=max_obs_chars,
        limits=SandboxLimits(timeout_s=timeout_s, max_rows=max_rows),
    )


SPEC = EnvSpec(
    name="intercode_sql",
    make=make_env,
    tasks=list_tasks,
    experts=make_experts,
    prompts=PROMPTS,
    max_steps=MAX_STEPS,
    memory_size=3,
)
