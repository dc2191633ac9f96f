"""Read-only, time- and size-limited SQLite execution for model-written SQL.

Four layers, so that no single mistake lets a query change a database:

1. files open through a ``mode=ro`` URI (SQLite refuses every write to the file);
2. ``PRAGMA query_only`` (refuses writes to any database of the connection);
3. an authorizer that allows only reading: SELECT, reads, functions (but not
   ``load_extension`` or ``printf``), recursive CTEs and a short list of schema pragmas such as
   ``table_info``; it denies ATTACH (which could create a file), writes, schema changes,
   transactions and every other pragma;
4. limits: a wall-clock budget per statement enforced by a progress handler, a cap on fetched
   rows, and SQLite limits on string/blob length, SQL length, LIKE pattern length and attached
   databases.

Bad SQL never raises out of :meth:`SqlSandbox.execute`; it comes back as an error message.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

READ_ONLY_PRAGMAS = frozenset(
    {"table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo", "foreign_key_list"}
)
"""Pragmas that only describe the schema; all others are denied (they can change connection state)."""

DENIED_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer", "printf", "format"})
"""``printf('%.*c', 2000000000, 'x')`` runs for half a minute inside one call, where no progress
handler or interrupt can stop it (SQLite 3.40); SQL for these tasks has no need of it."""

_ALLOWED_ACTIONS = frozenset(
    {
        sqlite3.SQLITE_SELECT,
        sqlite3.SQLITE_READ,
        sqlite3.SQLITE_FUNCTION,
        sqlite3.SQLITE_RECURSIVE,
        sqlite3.SQLITE_PRAGMA,
    }
)


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 2.0
    """Wall-clock budget of one statement, fetching included."""
    max_rows: int = 10_000
    """Rows fetched at most; more are reported as truncated (reward is computed on what was fetched)."""
    max_value_bytes: int = 1_000_000
    """Longest string or blob a query may build (SQLITE_LIMIT_LENGTH)."""
    max_sql_chars: int = 100_000
    progress_ops: int = 2_000
    """SQLite VM instructions between two deadline checks."""


@dataclass(frozen=True)
class QueryResult:
    rows: list[tuple[object, ...]] | None
    """Fetched rows; None when the statement failed."""
    error: str | None = None
    truncated: bool = False
    """More rows existed than ``max_rows``."""
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.rows is not None


def _decode_text(raw: bytes) -> str:
    # A query can build text that is not valid UTF-8 (CAST(x'ff' AS TEXT)); show it, don't fail.
    return raw.decode("utf-8", errors="replace")


def _authorize(action: int, arg1: str | None, arg2: str | None, _db: str | None, _trigger: str | None) -> int:
    if action not in _ALLOWED_ACTIONS:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() not in READ_ONLY_PRAGMAS:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


class SqlSandbox:
    """One locked-down connection. Use :meth:`open_file` for a database file, :meth:`from_bytes`
    for an in-memory image (synthetic databases)."""

    def __init__(
        self, connection: sqlite3.Connection, limits: SandboxLimits | None = None, *, name: str = ""
    ) -> None:
        self.limits = limits or SandboxLimits()
        self.name = name
        self._deadline = 0.0
        con = self._con = connection
        con.isolation_level = None  # autocommit: the sqlite3 module must never issue BEGIN itself
        con.text_factory = _decode_text
        con.execute("PRAGMA query_only = ON")
        con.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        con.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, self.limits.max_value_bytes)
        con.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, self.limits.max_sql_chars)
        con.setlimit(sqlite3.SQLITE_LIMIT_LIKE_PATTERN_LENGTH, 1000)
        con.set_authorizer(_authorize)
        con.set_progress_handler(self._over_time, self.limits.progress_ops)

    @classmethod
    def open_file(cls, path: str | Path, limits: SandboxLimits | None = None) -> SqlSandbox:
        """Open a database file read-only, in place (no copy, nothing written beside it)."""
        path = Path(path).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"SQLite database not found: {path}")
        uri = f"file:{urllib.parse.quote(str(path))}?mode=ro"
        return cls(sqlite3.connect(uri, uri=True, check_same_thread=False), limits, name=path.stem)

    @classmethod
    def from_bytes(cls, image: bytes, limits: SandboxLimits | None = None, *, name: str = "") -> SqlSandbox:
        """A private in-memory copy of a serialised database (``Connection.serialize()`` output)."""
        con = sqlite3.connect(":memory:", check_same_thread=False)
        con.deserialize(image)
        return cls(con, limits, name=name)

    def _over_time(self) -> int:
        return int(time.monotonic() > self._deadline)

    def execute(
        self, sql: str, *, timeout_s: float | None = None, max_rows: int | None = None
    ) -> QueryResult:
        """Run one statement; failures (syntax, denied, timeout, several statements) become ``error``."""
        timeout = self.limits.timeout_s if timeout_s is None else timeout_s
        cap = self.limits.max_rows if max_rows is None else max_rows
        start = time.monotonic()
        self._deadline = start + timeout
        cursor = None
        try:
            cursor = self._con.execute(sql)
            rows = cursor.fetchmany(cap + 1) if cursor.description is not None else []
        except sqlite3.OperationalError as err:
            message = (
                f"query took longer than {timeout:g} s and was stopped"
                if "interrupt" in str(err)
                else str(err)
            )
            return QueryResult(None, message, elapsed_s=time.monotonic() - start)
        except (sqlite3.Error, ValueError, UnicodeError, OverflowError, MemoryError) as err:
            return QueryResult(None, str(err) or type(err).__name__, elapsed_s=time.monotonic() - start)
        finally:
            if cursor is not None:
                cursor.close()
        truncated = len(rows) > cap
        return QueryResult(rows[:cap], truncated=truncated, elapsed_s=time.monotonic() - start)

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> SqlSandbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class SandboxPool:
    """Sandboxes shared by key, least recently used dropped past ``capacity``.

    Many env instances (the loop makes one per task) share a few databases; a sandbox keeps no
    state between statements, so one connection per database serves them all. A dropped
    sandbox is not closed here: an env may still hold it, and it closes when the last holder lets go.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, SqlSandbox] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, opener: Callable[[], SqlSandbox]) -> SqlSandbox:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            sandbox = self._items[key] = opener()
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
            return sandbox
