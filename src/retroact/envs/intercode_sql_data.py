"""InterCode-SQL / Spider data: task files, database files, splits and the gold-result cache.

A dataset is a task JSON plus a folder of SQLite files. Two task formats are read:

* InterCode (``ic_spider_dev.json``): ``{db, gold, query (the question), hardness, ...}``;
* Spider (``dev.json``): ``{db_id, query (the SQL), question, ...}``.

Databases are found as ``<db_dir>/<db>.sqlite`` (InterCode's converted copies) or
``<db_dir>/<db>/<db>.sqlite`` (Spider's ``database/`` folder). Files are only ever opened
read-only, in place. The first ``test_size`` tasks (100) are the test split, the rest train.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from retroact.envs.base import Task, seeded_sample
from retroact.envs.sql_reward import orders_rows, row_key
from retroact.envs.sql_sandbox import SqlSandbox
from retroact.paths import data_path

DATA_DIR = "intercode_sql"
TASK_FILE = "ic_spider_dev.json"
DB_DIR = "sqlite"
TEST_SIZE = 100
GOLD_TIMEOUT_S = 30.0
GOLD_MAX_ROWS = 1_000_000


class SqlDataError(ValueError):
    """A task file or database folder is malformed; the message names the file, task and field."""


@dataclass(frozen=True)
class SqlDataset:
    task_file: Path
    db_dir: Path
    tasks: tuple[Task, ...]
    """All tasks in file order; ``split`` is already set (first ``test_size`` are test)."""

    def split(self, name: str) -> list[Task]:
        if name not in ("train", "test"):
            raise ValueError(f"InterCode-SQL has splits train and test, not {name!r}")
        return [t for t in self.tasks if t.split == name]


def _field(entry: dict[str, object], name: str, where: str) -> str:
    value = entry.get(name)
    if not isinstance(value, str) or not value.strip():
        raise SqlDataError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")
    return value


def _find_db(db_dir: Path, db: str, where: str) -> Path:
    for candidate in (db_dir / f"{db}.sqlite", db_dir / db / f"{db}.sqlite"):
        if candidate.is_file():
            return candidate.resolve()
    raise SqlDataError(
        f"{where}: database {db!r} not found as {db_dir}/{db}.sqlite or {db_dir}/{db}/{db}.sqlite"
    )


def load_dataset(
    task_file: str | Path | None = None, db_dir: str | Path | None = None, *, test_size: int = TEST_SIZE
) -> SqlDataset:
    """Read and validate a task file (default: the shipped InterCode data); every task's database must exist.

    Payload of each task: ``db``, ``db_path`` (absolute), ``question``, ``gold``, ``hardness``, ``index``,
    and ``db_tables`` (table -> columns) when the file has it.
    """
    task_file = Path(task_file) if task_file else data_path(f"{DATA_DIR}/{TASK_FILE}")
    db_dir = Path(db_dir) if db_dir else data_path(f"{DATA_DIR}/{DB_DIR}")
    try:
        raw = json.loads(task_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SqlDataError(f"{task_file}: cannot read task JSON: {err}") from None
    if not isinstance(raw, list):
        raise SqlDataError(f"{task_file}: expected a JSON list of tasks, got {type(raw).__name__}")
    tasks = []
    for i, entry in enumerate(raw):
        where = f"{task_file}: task {i}"
        if not isinstance(entry, dict):
            raise SqlDataError(f"{where}: expected an object, got {type(entry).__name__}")
        # InterCode names the SQL "gold" and the question "query"; Spider calls the SQL "query".
        names = ("db", "gold", "query") if "gold" in entry else ("db_id", "query", "question")
        db, gold, question = (_field(entry, name, where) for name in names)
        payload = {
            "db": db,
            "db_path": str(_find_db(db_dir, db, where)),
            "question": " ".join(question.split()),
            "gold": gold,
            "hardness": str(entry.get("hardness", "")),
            "index": i,
        }
        if isinstance(entry.get("db_tables"), dict):
            payload["db_tables"] = entry["db_tables"]
        tasks.append(Task(id=str(i), split="test" if i < test_size else "train", payload=payload))
    return SqlDataset(task_file=task_file, db_dir=db_dir, tasks=tuple(tasks))


def list_tasks(split: str, n: int | None = None, seed: int = 0) -> list[Task]:
    """``EnvSpec.tasks`` of ``intercode_sql``: the shipped data, test = tasks 0–99."""
    return seeded_sample(load_dataset().split(split), n, seed)


@dataclass(frozen=True)
class GoldResult:
    rows: tuple[str, ...]
    """Row keys (:func:`~retroact.envs.sql_reward.row_key`) in the gold query's order."""
    ordered: bool
    """The gold query sorts its rows, so the reward checks the answer's order."""
    error: str | None = None
    """The gold query failed (then every answer scores 0)."""


_GOLD_CACHE: dict[tuple[str, str], GoldResult] = {}


def gold_result(db_key: str, sql: str, sandbox: SqlSandbox) -> GoldResult:
    """The gold rows of ``sql`` on the database ``sandbox`` holds, computed once per process.

    ``db_key`` names the database's content (path and modification time, or a synthetic id),
    so that a changed file is never answered from the cache.
    """
    key = (db_key, sql)
    if key not in _GOLD_CACHE:
        res = sandbox.execute(sql, timeout_s=GOLD_TIMEOUT_S, max_rows=GOLD_MAX_ROWS)
        rows = tuple(row_key(r) for r in res.rows or ())
        _GOLD_CACHE[key] = GoldResult(rows=rows, ordered=orders_rows(sql), error=res.error)
    return _GOLD_CACHE[key]


def file_db_key(path: str | Path) -> str:
    stat = Path(path).stat()
    return f"{Path(path).resolve()}@{stat.st_mtime_ns}:{stat.st_size}"


@dataclass(frozen=True)
class GoldStats:
    n_tasks: int
    n_empty: int
    n_errors: int
    empty_by_db: dict[str, int]


def gold_stats(tasks: list[Task] | tuple[Task, ...]) -> GoldStats:
    """How many gold results are empty (kept: InterCode's databases are cut down) or fail."""
    empty: Counter[str] = Counter()
    errors = 0
    sandboxes: dict[str, SqlSandbox] = {}
    try:
        for task in tasks:
            path = task.payload["db_path"]
            if path not in sandboxes:
                sandboxes[path] = SqlSandbox.open_file(path)
            gold = gold_result(file_db_key(path), task.payload["gold"], sandboxes[path])
            errors += gold.error is not None
            if gold.error is None and not gold.rows:
                empty[task.payload["db"]] += 1
    finally:
        for sb in sandboxes.values():
            sb.close()
    return GoldStats(
        n_tasks=len(tasks),
        n_empty=sum(empty.values()),
        n_errors=errors,
        empty_by_db=dict(sorted(empty.items())),
    )
