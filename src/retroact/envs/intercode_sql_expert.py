"""Scripted InterCode-SQL expert (an oracle: it reads the gold query) and few-shot text for LLM experts.

Per trial the planner lists the tables, reads the columns of each table the gold query uses
(``PRAGMA table_info``), runs a query with a one-sentence thought, and submits. With
probability ``noise`` a task starts with a wrong query: a deterministic (per task and trial)
mistake such as a flipped sort order, a dropped LIMIT, an inverted or missing condition, a
duplicate-keeping SELECT, the wrong aggregate or a neighbouring column. A task can be wrong for
up to ``max_wrong`` trials in a row. After a wrong trial the reflector names the mistake in plain words (which
column, condition or order, never the gold query itself) and the plan to fix it, and the
planner, seeing a reflection in its memory, runs the right query next time.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from retroact.envs.base import MAX_ACTION_CHARS, Task
from retroact.envs.sql_reward import mask_literals, outer_text
from retroact.models.base import PlannerView, ReflectorView
from retroact.models.scripted import ScriptedPolicy

SCHEMA_QUERY = "SELECT name FROM sqlite_master WHERE type = 'table'"
MAX_STEPS = 10

FEWSHOT = """Example 1
Question: How many cakes cost more than 20 dollars?
> Thought: I will start by listing the tables. Action: execute[SELECT name FROM sqlite_master WHERE type = 'table']
[('bakery',), ('cake',)]
> Thought: I need the columns of cake. Action: execute[PRAGMA table_info(cake)]
[(0, 'cake_id', 'INTEGER', 0, None, 1), (1, 'bakery_id', 'INTEGER', 0, None, 0), (2, 'flavour', 'TEXT', 0, None, 0), (3, 'price', 'REAL', 0, None, 0)]
> Thought: I count the cakes whose price is above 20. Action: execute[SELECT count(*) FROM cake WHERE price > 20]
[(3,)]
> Thought: The rows answer the question, so I submit them. Action: submit

Example 2
Question: Who ran the fastest marathon in 2019?
> Thought: I will start by listing the tables. Action: execute[SELECT name FROM sqlite_master WHERE type = 'table']
[('runner',), ('result',)]
> Thought: I need the columns of runner. Action: execute[PRAGMA table_info(runner)]
[(0, 'runner_id', 'INTEGER', 0, None, 1), (1, 'name', 'TEXT', 0, None, 0), (2, 'country', 'TEXT', 0, None, 0)]
> Thought: I need the columns of result. Action: execute[PRAGMA table_info(result)]
[(0, 'runner_id', 'INTEGER', 0, None, 0), (1, 'race_year', 'INTEGER', 0, None, 0), (2, 'minutes', 'REAL', 0, None, 0)]
> Thought: I join runner and result, filter on the year, sort by minutes and keep the top row. Action: execute[SELECT runner.name FROM runner JOIN result ON runner.runner_id = result.runner_id WHERE result.year = 2019 ORDER BY result.minutes LIMIT 1]
Error: no such column: result.year
> Thought: The year column is called race_year. Action: execute[SELECT runner.name FROM runner JOIN result ON runner.runner_id = result.runner_id WHERE result.race_year = 2019 ORDER BY result.minutes LIMIT 1]
[('Ana Ruiz',)]
> Thought: The rows answer the question, so I submit them. Action: submit
"""  # noqa: E501 - exemplar lines are as long as the env's lines
"""Planner exemplars for LLM experts (students are zero-shot); a test replays them on SQLite."""

REFLECTION_FEWSHOT = """Example
Question: List the names of the three oldest dogs.
> Thought: I will start by listing the tables. Action: execute[SELECT name FROM sqlite_master WHERE type = 'table']
[('dog',), ('owner',)]
> Thought: I need the columns of dog. Action: execute[PRAGMA table_info(dog)]
[(0, 'dog_id', 'INTEGER', 0, None, 1), (1, 'name', 'TEXT', 0, None, 0), (2, 'age', 'INTEGER', 0, None, 0)]
> Thought: I use dog, sort by age and keep the top 3. Action: execute[SELECT name FROM dog ORDER BY age LIMIT 3]
[('Pip',), ('Rex',), ('Momo',)]
> Thought: The rows answer the question, so I submit them. Action: submit
Submitted.
Reflection: I sorted by age in ascending order, so I took the three youngest dogs instead of the three oldest. Next time I will sort by age in descending order, keep the top 3 and submit that result.
"""  # noqa: E501
"""Reflector exemplar for LLM experts."""

_NAME = r"[A-Za-z_][\w]*"
_TABLE_REF = re.compile(rf"\b(?:from|join)\s+({_NAME})", re.I)
_CLAUSE_END = re.compile(r"\b(?:group\s+by|order\s+by|having|limit|union|intersect|except)\b|$", re.I)
_DIRECTION = {"asc": "ascending", "desc": "descending"}


@dataclass(frozen=True)
class Mistake:
    """A wrong first attempt: the query run (empty: submit without an answering query) and its story."""

    kind: str
    sql: str
    what: str
    """What went wrong, as the reflection states it."""
    fix: str
    """The one change to make next time (a verb phrase)."""

    def plan(self) -> str:
        return f"Next time I will run my query again but {self.fix}, then submit its result."


def tables_in(sql: str) -> list[str]:
    """Tables named after FROM/JOIN, in order, without repeats."""
    seen: dict[str, str] = {}
    for name in _TABLE_REF.findall(mask_literals(sql)):
        seen.setdefault(name.lower(), name)
    return list(seen.values())


def _and_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe(sql: str) -> str:
    """A one-sentence plan of a query, as an expert's thought."""
    outer = outer_text(sql)
    tables = tables_in(sql) or ["the data"]
    parts = [f"join {_and_list(tables)}" if len(tables) > 1 else f"use {tables[0]}"]
    if agg := re.match(r"\s*select\s+(?:distinct\s+)?(count|avg|sum|min|max)\s*\(", outer, re.I):
        parts.append(
            {
                "count": "count the rows",
                "avg": "take the average",
                "sum": "add up the values",
                "min": "take the minimum",
                "max": "take the maximum",
            }[agg.group(1).lower()]
        )
    if where := re.search(rf"\bwhere\s+(?:not\s+)?({_NAME}(?:\.{_NAME})?)", outer, re.I):
        parts.append(f"filter on {where.group(1)}")
    if re.search(r"\(\s*select\b", mask_literals(sql), re.I):
        parts.append("use a subquery")
    if group := re.search(rf"\bgroup\s+by\s+({_NAME}(?:\.{_NAME})?)", outer, re.I):
        parts.append(f"group by {group.group(1)}")
    if order := re.search(r"\border\s+by\s+([^,]+?)(?:\s+(asc|desc))?\s*(?:,|\blimit\b|$)", outer, re.I):
        key = order.group(1).strip() or "the computed value"
        parts.append(f"sort by {key}" + (" descending" if (order.group(2) or "").lower() == "desc" else ""))
    if limit := re.search(r"\blimit\s+(\d+)", outer, re.I):
        parts.append(f"keep the top {limit.group(1)}" if order else f"keep {limit.group(1)} rows")
    return "I " + _and_list(parts) + "."


def _clause_end(outer: str, start: int) -> int:
    match = _CLAUSE_END.search(outer, start)
    assert match is not None  # the pattern matches at the end of the string at the latest
    return match.start()


def _flip_order(sql: str, outer: str) -> Mistake | None:
    order = list(re.finditer(r"\border\s+by\s+", outer, re.I))
    if not order:
        return None
    start = order[-1].end()
    limit = re.search(r"\blimit\b", outer[start:], re.I)
    end = start + limit.start() if limit else len(sql)
    key_end = outer.find(",", start, end)
    key_end = end if key_end == -1 else key_end
    key = sql[start:key_end].rstrip().rstrip(";").rstrip()
    direction = re.search(r"\s+(asc|desc)$", key, re.I)
    expr = key[: direction.start()] if direction else key
    right = (direction.group(1) if direction else "asc").lower()
    wrong = "asc" if right == "desc" else "desc"
    wrong_sql = sql[:start] + f"{expr} {wrong.upper()}" + sql[start + len(key) :]
    what = f"I sorted by {expr} in {_DIRECTION[wrong]} order, but the question asks for {_DIRECTION[right]}"
    what += " order, so I took rows from the wrong end of the list." if limit else " order."
    return Mistake("flip_order", wrong_sql, what, f"sort by {expr} in {_DIRECTION[right]} order")


def _drop_limit(sql: str, outer: str) -> Mistake | None:
    limit = re.search(r"\blimit\s+(\d+)\s*;?\s*$", outer, re.I)
    if not limit:
        return None
    n = limit.group(1)
    return Mistake(
        "drop_limit",
        sql[: limit.start()].rstrip(),
        f"I returned every matching row, but the question asks only for the top {n}.",
        f"keep only the first {n} row{'s' if n != '1' else ''} with LIMIT {n}",
    )


def _flip_comparison(sql: str, outer: str) -> Mistake | None:
    match = re.search(rf"({_NAME}(?:\.{_NAME})?)\s*(>=|<=|<>|>|<)", mask_literals(sql))
    if not match or match.group(2) == "<>":
        return None
    op = match.group(2)
    right_op, wrong_op = op, {">": "<", "<": ">", ">=": "<=", "<=": ">="}[op]
    col = match.group(1)
    wrong_sql = sql[: match.start(2)] + wrong_op + sql[match.end(2) :]
    return Mistake(
        "flip_comparison",
        wrong_sql,
        f"The condition on {col} pointed the wrong way: I used {wrong_op} where the question needs "
        f"{right_op}.",
        f"compare {col} with {right_op}",
    )


def _negate_equality(sql: str, outer: str) -> Mistake | None:
    match = re.search(rf"\bwhere\s+({_NAME}(?:\.{_NAME})?)\s*(=)\s*(?=['\"\d])", mask_literals(sql), re.I)
    if not match:
        return None
    col = match.group(1)
    wrong_sql = sql[: match.start(2)] + "!=" + sql[match.end(2) :]
    return Mistake(
        "negate_equality",
        wrong_sql,
        f"My condition on {col} was inverted: I kept the rows that differ from the value in the "
        f"question instead of the rows that match it.",
        f"keep only the rows whose {col} equals that value",
    )


def _drop_condition(sql: str, outer: str) -> Mistake | None:
    where = re.search(r"\bwhere\b", outer, re.I)
    if not where:
        return None
    end = _clause_end(outer, where.end())
    clause = outer[where.end() : end]
    if re.search(r"\bbetween\b", clause, re.I):
        return None  # its AND is not a separate condition
    joint = re.search(rf"\b(and|or)\s+(?:not\s+)?({_NAME}(?:\.{_NAME})?)", clause, re.I)
    if joint:
        nxt = re.search(r"\s(?:and|or)\s", clause[joint.end() :], re.I)
        stop = where.end() + joint.end() + (nxt.start() if nxt else len(clause) - joint.end())
        col = joint.group(2)
        # Cut at the keyword itself: the blanked text before it may hide a string literal.
        wrong_sql = sql[: where.end() + joint.start()].rstrip() + sql[stop:]
        kind = "drop_condition"
    else:
        col_match = re.match(rf"\s*(?:not\s+)?({_NAME}(?:\.{_NAME})?)", clause, re.I)
        col = col_match.group(1) if col_match else "the filter column"
        wrong_sql = (sql[: where.start()].rstrip() + " " + sql[end:].lstrip()).strip()
        kind = "drop_where"
    return Mistake(
        kind,
        wrong_sql,
        f"I left out the condition on {col}, so rows the question excludes stayed in.",
        f"add the condition on {col} that the question states",
    )


def _drop_distinct(sql: str, outer: str) -> Mistake | None:
    match = re.match(r"\s*select\s+(distinct\s+)", outer, re.I)
    if not match:
        return None
    return Mistake(
        "drop_distinct",
        sql[: match.start(1)] + sql[match.end(1) :],
        "My result repeated some values; the question wants each one listed once.",
        "use SELECT DISTINCT",
    )


_AGGREGATE_SWAP = {"max": "min", "min": "max", "avg": "sum", "sum": "avg"}
_AGGREGATE_WORD = {"max": "maximum", "min": "minimum", "avg": "average", "sum": "total"}


def _swap_aggregate(sql: str, outer: str) -> Mistake | None:
    match = re.search(r"\b(max|min|avg|sum)\s*\(", mask_literals(sql), re.I)
    if not match:
        return None
    right = match.group(1).lower()
    wrong = _AGGREGATE_SWAP[right]
    upper = match.group(1).isupper()
    wrong_sql = sql[: match.start(1)] + (wrong.upper() if upper else wrong) + sql[match.end(1) :]
    return Mistake(
        "swap_aggregate",
        wrong_sql,
        f"I computed the {_AGGREGATE_WORD[wrong]} where the question asks for the {_AGGREGATE_WORD[right]}.",
        f"use {right.upper()} instead of {wrong.upper()}",
    )


def _wrong_column(sql: str, outer: str, columns: dict[str, list[str]], rng: random.Random) -> Mistake | None:
    match = re.match(
        rf"\s*select\s+(?:distinct\s+)?(?:(?P<prefix>{_NAME})\.)?({_NAME})\s*(?:,|\bfrom\b)", outer, re.I
    )
    if not match:
        return None
    right = match.group(2)
    lowered = {t.lower(): cols for t, cols in columns.items()}
    used = set(re.findall(_NAME, mask_literals(sql).lower()))
    candidates = tables_in(sql)
    if prefix := match.group("prefix"):  # T2.name: only the table aliased T2 will do
        aliased = re.search(rf"\b(?:from|join)\s+({_NAME})\s+(?:as\s+)?{re.escape(prefix)}\b", outer, re.I)
        candidates = [aliased.group(1)] if aliased else [prefix]
    for table in candidates:
        cols = lowered.get(table.lower(), [])
        if right.lower() in (c.lower() for c in cols):
            others = [c for c in cols if c.lower() not in used and re.fullmatch(_NAME, c)]
            # A key column is an unlikely slip; pick one only when nothing else is left.
            others = [c for c in others if not c.lower().endswith("id")] or others
            if others:
                wrong = rng.choice(others)
                return Mistake(
                    "wrong_column",
                    sql[: match.start(2)] + wrong + sql[match.end(2) :],
                    f"I returned the column {wrong} of {table}, but the question asks for {right}.",
                    f"select {right} instead of {wrong}",
                )
    return None


def mistakes(sql: str, columns: dict[str, list[str]], rng: random.Random) -> list[Mistake]:
    """Every wrong variant of ``sql`` this expert knows how to make (possibly none)."""
    outer = outer_text(sql)
    found = [
        m(sql, outer)
        for m in (
            _flip_order,
            _drop_limit,
            _flip_comparison,
            _negate_equality,
            _drop_condition,
            _drop_distinct,
            _swap_aggregate,
        )
    ]
    found.append(_wrong_column(sql, outer, columns, rng))
    return [m for m in found if m is not None and m.sql != sql]


class _EarlySubmit(Mistake):
    def plan(self) -> str:
        return "Next time I will write the full query, look at its rows, and submit right after it."


EARLY_SUBMIT = _EarlySubmit(
    "early_submit",
    "",
    "I submitted before running a query that answers the question, so my answer was only schema information.",
    "",
)


@dataclass(frozen=True)
class SqlExpert:
    """Deterministic oracle planner and reflector; ``noise`` is the chance a task starts wrong."""

    noise: float = 0.3
    max_wrong: int = 2
    seed: int = 0

    def wrong_trials(self, task: Task) -> int:
        """How many first trials of ``task`` go wrong (0 for most tasks)."""
        rng = random.Random(f"{self.seed}:{task.id}:noise")
        n = 0
        while n < self.max_wrong and rng.random() < self.noise:
            n += 1
        return n

    def mistake(self, task: Task, trial: int) -> Mistake | None:
        """The mistake made in ``trial`` of ``task``, or None for a correct trial."""
        if trial >= self.wrong_trials(task):
            return None
        rng = random.Random(f"{self.seed}:{task.id}:{trial}")
        options = mistakes(task.payload["gold"], task.payload.get("db_tables") or {}, rng)
        return rng.choice(options) if options else EARLY_SUBMIT

    def plan(self, task: Task, trial: int, memory: tuple[str, ...]) -> list[str]:
        """The action lines of one trial."""
        gold = task.payload["gold"]
        lines = [f"Thought: I will start by listing the tables. Action: execute[{SCHEMA_QUERY}]"]
        lines += [
            f"Thought: I need the columns of {t}. Action: execute[PRAGMA table_info({t})]"
            for t in tables_in(gold)[: MAX_STEPS - 3]
        ]
        mistake = self.mistake(task, trial)
        if mistake is EARLY_SUBMIT:
            lines.append("Thought: I think I have seen enough, so I submit. Action: submit")
            return lines
        query = mistake.sql if mistake else gold
        lead = "Following my reflection, " if memory else ""
        thought = lead + describe(query)
        line = f"Thought: {thought[0].upper() + thought[1:]} Action: execute[{query}]"
        lines.append(line if len(line) <= MAX_ACTION_CHARS else f"Action: execute[{query}]")
        lines.append("Thought: The rows answer the question, so I submit them. Action: submit")
        return lines

    def act(self, view: PlannerView | ReflectorView) -> str:
        if isinstance(view, ReflectorView):
            return self.reflect(view)
        plan = self.plan(view.task, view.trial, view.memory)
        return plan[min(len(view.history), len(plan) - 1)]

    def reflect(self, view: ReflectorView) -> str:
        mistake = self.mistake(view.task, view.trial)
        partly = "Part of my result was right, but not all of it. " if 0 < view.reward < 1 else ""
        if mistake is None:  # not one of its planned slips, e.g. an action line cut by the loop
            return (
                f"{partly}My last query did not give what the question asks for. Next time I will check "
                f"which tables and columns the question needs, run one full query, look at its rows, and "
                f"submit right after it."
            )
        return f"{partly}{mistake.what} {mistake.plan()}"


def make_experts(
    noise: float = 0.3, max_wrong: int = 2, seed: int = 0
) -> tuple[ScriptedPolicy, ScriptedPolicy]:
    """``EnvSpec.experts`` of the SQL envs: planner and reflector oracles sharing one noise schedule."""
    expert = SqlExpert(noise=noise, max_wrong=max_wrong, seed=seed)
    planner = ScriptedPolicy("expert:intercode_sql", expert.act)
    return planner, ScriptedPolicy("expert:intercode_sql-reflector", expert.act)
