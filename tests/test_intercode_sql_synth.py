import json
import random
import re
from collections import Counter

import pytest

from retroact.agent.loop import LoopConfig, run_trials
from retroact.envs import get_spec, list_tasks, make_env
from retroact.envs.base import Task
from retroact.envs.intercode_sql_expert import mistakes
from retroact.envs.intercode_sql_synth import (
    QUESTIONS_PER_DB,
    TEST_DOMAINS,
    database_image,
    domains,
)
from retroact.envs.sql_reward import orders_rows
from retroact.envs.sql_sandbox import SqlSandbox

ENV = "intercode_sql-synth"


@pytest.fixture(scope="module")
def splits() -> dict[str, list[Task]]:
    return {s: list_tasks(ENV, s) for s in ("train", "test")}


def tables_of(tasks: list[Task]) -> set[str]:
    return {t for task in tasks for t in task.payload["db_tables"]}


def test_sizes_ids_and_disjoint_schemas(splits: dict[str, list[Task]]) -> None:
    train, test = splits["train"], splits["test"]
    assert len(test) == 3 * 4 * QUESTIONS_PER_DB and len(train) == 9 * 12 * QUESTIONS_PER_DB
    assert len({t.id for t in train + test}) == len(train) + len(test)
    assert {t.payload["domain"] for t in test} == TEST_DOMAINS
    assert not tables_of(train) & tables_of(test)
    assert {t.split for t in train} == {"train"} and {t.split for t in test} == {"test"}
    json.dumps([t.payload for t in train + test])  # plain data
    with pytest.raises(ValueError, match="splits train and test"):
        domains("dev")


def test_generation_is_deterministic(splits: dict[str, list[Task]]) -> None:
    assert list_tasks(ENV, "test") == splits["test"]
    assert list_tasks(ENV, "test", 10, seed=3) == list_tasks(ENV, "test", 10, seed=3)
    assert list_tasks(ENV, "test", 10, seed=3) != list_tasks(ENV, "test", 10, seed=4)
    database_image.cache_clear()
    assert database_image("zoo", 5) == database_image.__wrapped__("zoo", 5)


def test_question_mix_covers_every_sql_feature(splits: dict[str, list[Task]]) -> None:
    golds = [t.payload["gold"] for t in splits["train"]]
    for feature in ("WHERE", "JOIN", "GROUP BY", "HAVING", "ORDER BY", "LIMIT", "count(*)", "avg("):
        assert sum(feature in g for g in golds) >= 40, feature
    kinds = Counter(t.payload["kind"] for t in splits["train"])
    assert len(kinds) >= 14


ORDERED = re.compile(
    r"SELECT .+? FROM (?P<rest>.+) ORDER BY (?P<key>.+?)(?P<dir> ASC| DESC)?(?: LIMIT (?P<n>\d+))?"
)


def test_every_gold_runs_has_rows_and_a_unique_order(splits: dict[str, list[Task]]) -> None:
    n_ordered = 0
    for task in splits["train"] + splits["test"]:
        gold = task.payload["gold"]
        with SqlSandbox.from_bytes(database_image(task.payload["domain"], task.payload["db_seed"])) as sb:
            res = sb.execute(gold)
            assert res.ok and res.rows, task.id
            if orders_rows(gold):
                # No ties among the sorted keys (up to one past the LIMIT): the gold order is unique.
                m = ORDERED.fullmatch(gold)
                assert m, gold
                keys = sb.execute(
                    f"SELECT {m['key']} FROM {m['rest']} ORDER BY {m['key']}{m['dir'] or ''}"
                ).rows
                assert keys is not None
                head = keys[: int(m["n"]) + 1] if m["n"] else keys
                assert len(set(head)) == len(head), task.id
                n_ordered += 1
    assert n_ordered > 200


def test_expert_rollout_learns_across_trials(splits: dict[str, list[Task]]) -> None:
    spec = get_spec(ENV)
    assert spec.max_steps == 10 and spec.memory_size == 3
    result = run_trials(ENV, splits["test"], *spec.experts(), LoopConfig(trials=3))
    success = result.per_trial_success
    assert success[0] < success[1] < success[2] == 1.0
    assert result.n_errors == 0 and result.n_repeat_stops == 0
    refl = [r.output for r in result.records if r.role == "reflector"]
    assert refl and not any("SELECT" in text for text in refl)


def test_every_template_has_a_mistake_for_noisy_experts(splits: dict[str, list[Task]]) -> None:
    for task in splits["test"]:
        assert mistakes(task.payload["gold"], task.payload["db_tables"], random.Random(0)), task.id


def test_env_episode() -> None:
    task = next(t for t in list_tasks(ENV, "test") if t.payload["kind"] == "lowest")
    env = make_env(ENV)
    assert env.reset(task).startswith("Question: Which ")
    tables = env.step("Action: execute[SELECT name FROM sqlite_master WHERE type = 'table']").observation
    assert tables == str([(t,) for t in task.payload["db_tables"]])
    assert not env.step("Action: execute[DELETE FROM " + next(iter(task.payload["db_tables"])) + "]").done
    env.step(f"Action: execute[{task.payload['gold']}]")
    assert env.step("Action: submit").reward == 1.0
