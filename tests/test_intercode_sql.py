import json
import re
import sqlite3
from pathlib import Path

import pytest

from retroact.agent.loop import LoopConfig, run_trials
from retroact.agent.records import TrajectoryRecord
from retroact.data.import_intercode import convert_action, import_gpt4_trajectories
from retroact.envs import get_spec, list_tasks
from retroact.envs.base import Task
from retroact.envs.intercode_sql import (
    INVALID_ACTION,
    PROMPTS,
    SUBMITTED,
    TRIAL_OVER,
    InterCodeSqlEnv,
    SqlAction,
    format_result,
    parse_action,
)
from retroact.envs.intercode_sql_data import SqlDataError, gold_stats, load_dataset
from retroact.envs.intercode_sql_expert import FEWSHOT, REFLECTION_FEWSHOT, SqlExpert, make_experts
from retroact.envs.sql_sandbox import QueryResult
from tests.helpers import require_data


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("Thought: look. Action: execute[SELECT 1]", SqlAction("execute", "SELECT 1")),
        ("action:EXECUTE [ select a from [my table] ]", SqlAction("execute", "select a from [my table]")),
        ("execute[SELECT 1].", SqlAction("execute", "SELECT 1")),
        (
            "Action: execute[SELECT name FROM t WHERE x > 3",
            SqlAction("execute", "SELECT name FROM t WHERE x > 3"),
        ),
        ("Thought: my action: think. Action: execute[SELECT 2]", SqlAction("execute", "SELECT 2")),
        ("Thought: done. Action: submit", SqlAction("submit")),
        ("  SUBMIT.  ", SqlAction("submit")),
        ("submit[]", SqlAction("submit")),
        ("Action: execute[]", SqlAction("execute", "")),
        ("\n\nAction: submit\nAction: execute[SELECT 1]", SqlAction("submit")),
        ("SELECT * FROM t", None),
        ("Thought: I should look at the tables.", None),
        ("Action: submit the answer", None),
        ("Action: run[SELECT 1]", None),
        ("", None),
    ],
)
def test_parse_action(line: str, expected: SqlAction | None) -> None:
    assert parse_action(line) == expected


def test_format_result_caps_rows_and_characters() -> None:
    assert format_result(QueryResult([(1, "a")]), 25, 350) == "[(1, 'a')]"
    assert format_result(QueryResult([]), 25, 350) == "[]"
    assert format_result(QueryResult(None, "no such table: x"), 25, 350) == "Error: no such table: x"
    many = format_result(QueryResult([(i,) for i in range(30)]), 25, 350)
    assert (
        many.startswith("[(0,), (1,)")
        and "(24,)]" in many
        and "(25,)" not in many
        and many.endswith(" [30 rows]")
    )
    wide = format_result(QueryResult([("x" * 500,)]), 25, 350)
    assert wide == "[('" + "x" * 347 + "... [1 row]"
    capped = format_result(QueryResult([(1,)] * 3, truncated=True), 25, 350)
    assert capped.endswith("[more than 3 rows]")


def make_shop(db_dir: Path, nested: bool = False) -> Path:
    path = db_dir / "shop" / "shop.sqlite" if nested else db_dir / "shop.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT, price REAL, kind TEXT)")
    con.executemany(
        "INSERT INTO item VALUES (?, ?, ?, ?)",
        [
            (1, "pen", 2.5, "office"),
            (2, "lamp", 30.0, "home"),
            (3, "desk", 120.0, "office"),
            (4, "mug", 8.0, "home"),
        ],
    )
    con.commit()
    con.close()
    return path


SHOP_TASKS = [
    {
        "db": "shop",
        "gold": "SELECT name FROM item WHERE price > 5 ORDER BY price DESC",
        "query": "Names of items over 5, most expensive first?",
        "hardness": "easy",
        "db_tables": {"item": ["id", "name", "price", "kind"]},
    },
    {
        "db": "shop",
        "gold": "SELECT count(*) FROM item WHERE kind = 'office'",
        "query": "How many office items?",
        "hardness": "easy",
    },
    {
        "db": "shop",
        "gold": "SELECT name FROM item WHERE price > 1000",
        "query": "Items over 1000?",
        "hardness": "easy",
    },
]


@pytest.fixture
def shop(tmp_path: Path) -> tuple[Path, Path]:
    make_shop(tmp_path / "sqlite")
    task_file = tmp_path / "tasks.json"
    task_file.write_text(json.dumps(SHOP_TASKS))
    return task_file, tmp_path / "sqlite"


def test_loader_reads_intercode_and_spider_formats(shop: tuple[Path, Path], tmp_path: Path) -> None:
    ds = load_dataset(*shop, test_size=1)
    assert [t.id for t in ds.split("test")] == ["0"] and [t.id for t in ds.split("train")] == ["1", "2"]
    first = ds.tasks[0].payload
    assert first["question"] == SHOP_TASKS[0]["query"] and first["gold"] == SHOP_TASKS[0]["gold"]
    assert Path(first["db_path"]).is_file() and first["db_tables"] == SHOP_TASKS[0]["db_tables"]
    json.dumps([t.payload for t in ds.tasks])  # plain data

    make_shop(tmp_path / "database", nested=True)
    spider = tmp_path / "dev.json"
    spider.write_text(json.dumps([{"db_id": "shop", "query": "SELECT 1", "question": "One?"}]))
    task = load_dataset(spider, tmp_path / "database").tasks[0]
    assert task.payload["gold"] == "SELECT 1" and task.payload["question"] == "One?" and task.split == "test"
    with pytest.raises(ValueError, match="no split 'dev'|not 'dev'"):
        ds.split("dev")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{}", r"expected a JSON list"),
        ("[1]", r"task 0: expected an object"),
        ('[{"db": "shop", "gold": "", "query": "q"}]', r"task 0: field 'gold' must be a non-empty string"),
        (
            '[{"db": "shop", "gold": "SELECT 1", "query": "q"}, '
            '{"db": "nope", "gold": "SELECT 1", "query": "q"}]',
            r"task 1: database 'nope' not found",
        ),
        ("[{", r"cannot read task JSON"),
    ],
)
def test_loader_errors_name_file_task_and_field(
    shop: tuple[Path, Path], tmp_path: Path, content: str, message: str
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(SqlDataError, match=message) as err:
        load_dataset(bad, shop[1])
    assert "bad.json" in str(err.value)


def test_episode_rewards_and_observations(shop: tuple[Path, Path]) -> None:
    tasks = load_dataset(*shop).tasks
    env = InterCodeSqlEnv()
    assert env.step("Action: submit").observation == TRIAL_OVER  # no reset yet
    assert env.reset(tasks[0]) == "Question: Names of items over 5, most expensive first?"
    res = env.step("Thought: list. Action: execute[SELECT name FROM sqlite_master WHERE type = 'table']")
    assert res.observation == "[('item',)]" and res.info["valid"] and not res.done
    bad = env.step("Let me think about it")
    assert bad.observation == INVALID_ACTION and bad.info["valid"] is False and not bad.done
    assert env.step("Action: execute[]").observation == "Error: the query is empty."
    assert env.step("Action: execute[SELECT nam FROM item]").observation.startswith(
        "Error: no such column: nam"
    )
    right_rows_wrong_order = env.step("Action: execute[SELECT name FROM item WHERE price > 5 ORDER BY price]")
    assert right_rows_wrong_order.observation == "[('mug',), ('lamp',), ('desk',)]"
    end = env.step("Action: submit")
    assert end.done and end.observation == SUBMITTED and end.reward == 0.0 and end.info["success"] is False
    assert env.step("Action: submit").observation == TRIAL_OVER

    env.reset(tasks[0])
    env.step("Action: execute[SELECT name FROM item WHERE price > 5 ORDER BY price DESC]")
    end = env.step("submit")
    assert end.reward == 1.0 and end.info["success"] is True

    env.reset(tasks[0])
    env.step("Action: execute[SELECT name FROM item ORDER BY price DESC]")  # one extra row (pen)
    assert env.step("submit").reward == pytest.approx(3 / 4)

    env.reset(tasks[1])
    env.step("Action: execute[SELECT count(*) FROM item WHERE kind = 'office']")
    env.step("Action: execute[SELECT count(*) FROM item WHERE kind = 'offce']")  # the latest result counts
    assert env.step("Action: submit").reward == 0.0

    env.reset(tasks[1])
    env.step("Action: execute[SELECT count(*) FROM item WHERE kind = 'office']")
    env.step("Action: execute[DROP TABLE item]")  # an error replaces the answer
    assert env.step("Action: submit").reward == 0.0

    env.reset(tasks[2])  # empty gold: an empty answer matches, as in InterCode
    assert env.step("Action: submit").reward == 0.0  # nothing executed yet
    env.reset(tasks[2])
    env.step("Action: execute[SELECT name FROM item WHERE 0]")
    assert env.step("Action: submit").reward == 1.0
    env.close()


def test_gold_stats_count_empty_results(shop: tuple[Path, Path]) -> None:
    stats = gold_stats(load_dataset(*shop).tasks)
    assert (stats.n_tasks, stats.n_empty, stats.n_errors, stats.empty_by_db) == (3, 1, 0, {"shop": 1})


def _replay_exemplar(text: str, db: Path) -> int:
    """Run every action of an exemplar through the env and compare each observation written after it."""
    env = InterCodeSqlEnv()
    lines = text.splitlines()
    checked = 0
    for i, line in enumerate(lines):
        if line.startswith("Question: "):
            env.reset(
                Task(
                    "x",
                    "test",
                    {"question": line.removeprefix("Question: "), "gold": "SELECT 1", "db_path": str(db)},
                )
            )
        elif line.startswith("> "):
            observation = env.step(line[2:]).observation
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if nxt and not nxt.startswith(("> ", "Reflection:", "Example")):
                assert observation == nxt, line
                checked += 1
    return checked


EXEMPLAR_DBS = [
    """CREATE TABLE bakery (bakery_id INTEGER PRIMARY KEY, name TEXT);
       CREATE TABLE cake (cake_id INTEGER PRIMARY KEY, bakery_id INTEGER, flavour TEXT, price REAL);
       INSERT INTO cake VALUES (1, 1, 'lemon', 25), (2, 1, 'plum', 12), (3, 2, 'cocoa', 31),
                               (4, 2, 'fig', 22);""",
    """CREATE TABLE runner (runner_id INTEGER PRIMARY KEY, name TEXT, country TEXT);
       CREATE TABLE result (runner_id INTEGER, race_year INTEGER, minutes REAL);
       INSERT INTO runner VALUES (1, 'Ana Ruiz', 'Peru'), (2, 'Bo Lind', 'Sweden');
       INSERT INTO result VALUES (1, 2019, 151.5), (2, 2019, 160.0), (2, 2018, 149.0);""",
    """CREATE TABLE dog (dog_id INTEGER PRIMARY KEY, name TEXT, age INTEGER);
       CREATE TABLE owner (owner_id INTEGER PRIMARY KEY, name TEXT);
       INSERT INTO dog VALUES (1, 'Pip', 1), (2, 'Rex', 2), (3, 'Momo', 3), (4, 'Duke', 12);""",
]


def test_fewshot_exemplars_match_what_sqlite_shows(tmp_path: Path) -> None:
    examples = [
        e for text in (FEWSHOT, REFLECTION_FEWSHOT) for e in re.split(r"(?m)^Example.*\n", text) if e.strip()
    ]
    assert len(examples) == len(EXEMPLAR_DBS)
    checked = 0
    for i, (example, script) in enumerate(zip(examples, EXEMPLAR_DBS, strict=True)):
        db = tmp_path / f"exemplar{i}.sqlite"
        con = sqlite3.connect(db)
        con.executescript(script)
        con.close()
        checked += _replay_exemplar(example, db)
    assert checked == 12  # every observation written in the exemplars


def test_spec_and_prompts() -> None:
    spec = get_spec("intercode_sql")
    assert spec.max_steps == 10 and spec.memory_size == 3 and spec.reflector_sees_memory
    assert spec.prompts is PROMPTS and "execute[" in PROMPTS.planner_instruction and PROMPTS.fewshot
    planner, reflector = spec.experts()
    assert planner.info.name == "expert:intercode_sql"


def test_expert_mistakes_are_deterministic_and_reflections_hide_the_gold(shop: tuple[Path, Path]) -> None:
    tasks = list(load_dataset(*shop).tasks)
    noisy = SqlExpert(noise=1.0, max_wrong=1)
    first = [noisy.mistake(t, 0) for t in tasks]
    assert first == [noisy.mistake(t, 0) for t in tasks] and all(first)
    assert all(noisy.mistake(t, 1) is None for t in tasks)
    result = run_trials("intercode_sql", tasks, *make_experts(noise=1.0, max_wrong=1), LoopConfig(trials=2))
    assert [row[0] for row in result.successes] == [False] * 3
    assert [row[1] for row in result.successes] == [True] * 3
    reflections = [r.output for r in result.records if r.role == "reflector"]
    assert len(reflections) == 3
    for text, task in zip(reflections, tasks, strict=True):
        assert task.payload["gold"] not in text and "SELECT " not in text and "Next time" in text


@pytest.fixture(scope="module")
def real_test_tasks() -> list[Task]:
    require_data("intercode_sql/ic_spider_dev.json")
    return list_tasks("intercode_sql", "test")


def test_real_data_splits_and_gold_stats(real_test_tasks: list[Task]) -> None:
    ds = load_dataset()
    assert len(ds.tasks) == 1034 and len(ds.split("train")) == 934
    assert sorted(int(t.id) for t in real_test_tasks) == list(range(100))
    stats = gold_stats(ds.tasks)
    assert stats.n_errors == 0 and stats.n_empty == 91 and stats.empty_by_db["wta_1"] == 44


def test_real_expert_three_trials(real_test_tasks: list[Task]) -> None:
    result = run_trials("intercode_sql", real_test_tasks, *make_experts(), LoopConfig(trials=3))
    success = result.per_trial_success
    assert success[0] < 0.9 and success[0] < success[1] < success[2] == 1.0
    assert result.n_errors == 0 and result.n_valid_actions == result.n_actions
    again = run_trials("intercode_sql", real_test_tasks, *make_experts(), LoopConfig(trials=3))
    assert again.rewards == result.rewards
    clean = run_trials("intercode_sql", real_test_tasks, *make_experts(noise=0.0), LoopConfig(trials=1))
    assert clean.per_trial_success == [1.0]


def test_convert_mysql_actions() -> None:
    assert convert_action("SHOW TABLES;") == (
        "SELECT name FROM sqlite_master WHERE type = 'table'",
        "show_tables",
    )
    assert convert_action("describe `Pets`") == ("PRAGMA table_info(Pets)", "describe")
    assert convert_action("SHOW COLUMNS FROM city FROM world_1") == (
        "PRAGMA table_info(city)",
        "show_columns",
    )
    assert convert_action("SHOW CREATE TABLE city") == (
        "SELECT sql FROM sqlite_master WHERE name = 'city'",
        "show_create",
    )
    assert convert_action("USE world_1;") == (None, "use_db")
    assert convert_action("SHOW DATABASES") == (None, "show_other")
    assert convert_action("UPDATE t SET a = 1") == (None, "write")
    assert convert_action("Output: [('a',)]") == (None, "not_sql")
    assert convert_action("SELECT  a\nFROM t ;") == ("SELECT a FROM t", "kept")


def test_importer_on_a_small_file(shop: tuple[Path, Path], tmp_path: Path) -> None:
    tasks = list(load_dataset(*shop, test_size=0).tasks)

    def episode(i: int, actions: list[str], reward: float = 1.0) -> dict[str, object]:
        return {
            "query": SHOP_TASKS[i]["query"],
            "turn_history": {"actions": actions},
            "summary": {"max_reward": reward, "max_reward_idx": len(actions) - 1},
        }

    episodes = {
        "0": episode(
            0,
            [
                "USE shop",
                "SHOW TABLES",
                "DESCRIBE item",
                "SHOW COLUMNS FROM item",
                "SELECT name FROM item WHERE price > 5 ORDER BY price DESC",
            ],
        ),
        "1": episode(1, ["SELECT count(*) FROM item WHERE kind = 'OFFICE'"]),  # MySQL compares case-blind
        "2": episode(2, ["SHOW TABLES"] + ["SELECT 1"] * 1 + [f"SELECT {i}" for i in range(9)]),
    }
    path = tmp_path / "episodes.json"
    path.write_text(json.dumps(episodes))
    records, stats = import_gpt4_trajectories(path, tasks=tasks)
    assert stats.episodes == 3 and stats.too_many_steps == 1 and stats.replayed == 2
    assert stats.not_reproduced == 1 and stats.kept == 1 == len(records)
    assert stats.actions["use_db"] == 1 and stats.actions["repeat"] == 1 and stats.actions["show_tables"] == 2
    rec = records[0]
    assert isinstance(rec, TrajectoryRecord) and rec.task_id == "0" and rec.success and rec.reward == 1.0
    assert rec.n_steps == 4 and rec.source == "import:intercode-gpt4" and rec.env == "intercode_sql"
    assert rec.output.startswith(
        "Action: execute[SELECT name FROM sqlite_master WHERE type = 'table']\n[('item',)]\n> "
    )
    assert rec.output.endswith("> Action: submit\nSubmitted.\n")

    _, only_test = import_gpt4_trajectories(path, tasks=tasks, splits=("test",))
    assert only_test.other_split == 3 and only_test.kept == 0
    episodes["1"]["query"] = "Something else?"
    path.write_text(json.dumps(episodes))
    with pytest.raises(ValueError, match=r"episode '1': its question does not match"):
        import_gpt4_trajectories(path, tasks=tasks)


def test_importer_on_real_trajectories() -> None:
    require_data("intercode_sql/trajectories/ic_sql_multiturn_gpt-4_10_turns.json")
    records, stats = import_gpt4_trajectories()
    assert stats.episodes == 1034 and stats.other_split == 100
    assert stats.unsolved_on_mysql + stats.too_many_steps + stats.line_too_long + stats.replayed == 934
    assert stats.kept == len(records) >= 600
    assert all(r.split == "train" and r.success and int(r.task_id) >= 100 for r in records)
