import hashlib
import sqlite3
import time
from pathlib import Path

import pytest

from retroact.envs.sql_sandbox import SandboxLimits, SandboxPool, SqlSandbox
from tests.helpers import require_data

HOSTILE = [
    "DROP TABLE pet",
    "DELETE FROM pet",
    "INSERT INTO pet VALUES (9, 'Evil', 1)",
    "UPDATE pet SET name = 'x'",
    "CREATE TABLE t2 (a)",
    "CREATE TEMP TABLE t3 (a)",
    "ALTER TABLE pet ADD COLUMN c",
    "CREATE INDEX i ON pet(name)",
    "CREATE VIEW v AS SELECT 1",
    "CREATE TRIGGER tr AFTER INSERT ON pet BEGIN DELETE FROM pet; END",
    "REINDEX",
    "ANALYZE",
    "VACUUM",
    "BEGIN",
    "SAVEPOINT s",
    "PRAGMA query_only = 0",
    "PRAGMA writable_schema = 1",
    "PRAGMA journal_mode = WAL",
    "PRAGMA user_version = 7",
    "SELECT load_extension('/tmp/evil.so')",
    "SELECT 1; DROP TABLE pet",
    "SELECT * FROM pet; DELETE FROM pet;",
    "select 'a\x00b'",
    "SELECT '\udcff'",  # a lone surrogate: what undecodable bytes become in Python text
    "SELECT zeroblob(2000000000)",
    "SELECT length(printf('%.*c', 2000000000, 'x'))",  # would run 30 s inside one function call
    "SELECT format('%d', 1)",
    "SELECT length(replace(hex(zeroblob(400000)), '0', '00000'))",
    "SELECT * FROM pragma_table_info('pet')",  # the table-valued form goes through an UPDATE check
]


def make_db(path: Path) -> Path:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE pet (id INTEGER PRIMARY KEY, name TEXT, age INTEGER)")
    con.executemany("INSERT INTO pet VALUES (?, ?, ?)", [(i, f"pet{i}", i % 7) for i in range(1, 201)])
    con.execute("CREATE INDEX pet_age ON pet(age)")
    con.commit()
    con.close()
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    # A *writable* file in a writable folder: only the sandbox stands between a query and the bytes.
    return make_db(tmp_path / "pets.sqlite")


def test_reads_work(db: Path) -> None:
    with SqlSandbox.open_file(db) as sb:
        res = sb.execute("SELECT name FROM pet WHERE age = 3 ORDER BY id LIMIT 2")
        assert res.ok and res.rows == [("pet3",), ("pet10",)] and not res.truncated
        assert [r[1] for r in sb.execute("PRAGMA table_info(pet)").rows or []] == ["id", "name", "age"]
        assert sb.execute("PRAGMA index_list(pet)").rows
        assert sb.execute("SELECT name FROM sqlite_master WHERE type = 'table'").rows == [("pet",)]
        cte = (
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 5) SELECT sum(x) FROM c"
        )
        assert sb.execute(cte).rows == [(15,)]
        assert sb.execute("SELECT 1;  -- trailing comment").rows == [(1,)]


def test_hostile_statements_fail_cleanly_and_leave_the_file_unchanged(db: Path) -> None:
    before, mtime = digest(db), db.stat().st_mtime_ns
    with SqlSandbox.open_file(db) as sb:
        for sql in HOSTILE:
            res = sb.execute(sql)
            assert not res.ok and res.error, sql
        assert sb.execute("SELECT count(*) FROM pet").rows == [(200,)]
    assert digest(db) == before and db.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in db.parent.iterdir()) == ["pets.sqlite"]  # no journal, WAL or new file


def test_attach_cannot_create_or_read_another_file(db: Path, tmp_path: Path) -> None:
    other = make_db(tmp_path / "other.sqlite")
    target = tmp_path / "created_by_attach.sqlite"
    with SqlSandbox.open_file(db) as sb:
        for sql in (
            f"ATTACH DATABASE '{target}' AS x",
            f"ATTACH '{other}' AS o",
            "VACUUM INTO '" + str(target) + "'",
        ):
            res = sb.execute(sql)
            assert not res.ok, sql
    assert not target.exists()


def test_runaway_queries_are_stopped_by_the_time_limit(db: Path) -> None:
    limits = SandboxLimits(timeout_s=0.3)
    bombs = [
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
        "SELECT count(*) FROM pet a, pet b, pet c, pet d",
        "SELECT a.name FROM pet a, pet b, pet c ORDER BY random() LIMIT 1",
    ]
    with SqlSandbox.open_file(db, limits) as sb:
        for sql in bombs:
            start = time.monotonic()
            res = sb.execute(sql)
            assert not res.ok and "longer than 0.3 s" in (res.error or ""), sql
            assert time.monotonic() - start < 2.0
        assert sb.execute("SELECT count(*) FROM pet").rows == [(200,)]  # still usable


def test_huge_results_are_capped(db: Path) -> None:
    with SqlSandbox.open_file(db, SandboxLimits(max_rows=1000)) as sb:
        res = sb.execute("SELECT a.id, b.id FROM pet a, pet b")  # 40 000 rows
        assert res.ok and res.truncated and len(res.rows or []) == 1000
        assert sb.execute("SELECT 1", max_rows=0).truncated


def test_invalid_utf8_in_data_is_replaced_not_fatal(db: Path) -> None:
    with SqlSandbox.open_file(db) as sb:
        assert sb.execute("SELECT CAST(x'ff41' AS TEXT)").rows == [("\ufffdA",)]


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.sqlite"):
        SqlSandbox.open_file(tmp_path / "nope.sqlite")


def test_in_memory_image_is_locked_down_too(db: Path) -> None:
    con = sqlite3.connect(db)
    image = con.serialize()
    con.close()
    with SqlSandbox.from_bytes(image, name="pets") as sb:
        for sql in HOSTILE:
            assert not sb.execute(sql).ok, sql
        assert sb.execute("SELECT count(*) FROM pet").rows == [(200,)]
        assert sb.name == "pets"


def test_shared_real_database_is_unchanged_by_hostile_input() -> None:
    path = require_data("intercode_sql/sqlite/pets_1.sqlite")
    before = digest(path)
    with SqlSandbox.open_file(path, SandboxLimits(timeout_s=0.2)) as sb:
        for sql in [
            *HOSTILE,
            "DROP TABLE Pets",
            "DELETE FROM Student",
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c",
        ]:
            assert not sb.execute(sql).ok, sql
        assert sb.execute("SELECT count(*) FROM Pets").rows == [(3,)]
    assert digest(path) == before


def test_pool_shares_and_evicts_least_recently_used(db: Path) -> None:
    pool = SandboxPool(capacity=2)
    opened: list[str] = []

    def opener(name: str):  # noqa: ANN202 - test helper
        def make() -> SqlSandbox:
            opened.append(name)
            return SqlSandbox.open_file(db)

        return make

    a = pool.get("a", opener("a"))
    assert pool.get("a", opener("a")) is a
    pool.get("b", opener("b"))
    pool.get("a", opener("a"))  # a is now the most recent
    pool.get("c", opener("c"))  # evicts b
    pool.get("b", opener("b"))
    assert opened == ["a", "b", "c", "b"]
    assert a.execute("SELECT 1").rows == [(1,)]  # an evicted or shared sandbox stays usable by its holder
