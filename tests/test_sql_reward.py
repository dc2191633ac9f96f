import ast
import itertools
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retroact.envs.sql_reward import intercode_reward, kendall_tau_b, orders_rows, row_key
from tests.helpers import require_data


def brute_tau_b(x: list[str], y: list[str]) -> float:
    """Textbook τ-b over all pairs."""
    conc = disc = only_x = only_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        a = (x[i] > x[j]) - (x[i] < x[j])
        b = (y[i] > y[j]) - (y[i] < y[j])
        if a == 0 and b == 0:
            continue
        if a == 0:
            only_x += 1
        elif b == 0:
            only_y += 1
        elif a * b > 0:
            conc += 1
        else:
            disc += 1
    denom = math.sqrt((conc + disc + only_x) * (conc + disc + only_y))
    return math.nan if denom == 0 else (conc - disc) / denom


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from("pqrst")), max_size=14))
def test_fast_tau_b_equals_the_textbook_definition(pairs: list[tuple[str, str]]) -> None:
    x, y = [p[0] for p in pairs], [p[1] for p in pairs]
    fast, slow = kendall_tau_b(x, y), brute_tau_b(x, y)
    assert (math.isnan(fast) and math.isnan(slow)) or fast == pytest.approx(slow, abs=1e-12)


def test_tau_b_known_values() -> None:
    assert kendall_tau_b(list("abc"), list("abc")) == 1.0
    assert kendall_tau_b(list("abc"), list("cba")) == -1.0
    # one swapped neighbour pair out of three pairs: (2 - 1) / 3
    assert kendall_tau_b(list("bac"), list("abc")) == pytest.approx(1 / 3)
    assert math.isnan(kendall_tau_b(["a"], ["a"]))
    assert math.isnan(kendall_tau_b(list("aaa"), list("abc")))  # no variation on one side
    with pytest.raises(ValueError, match="equal lengths"):
        kendall_tau_b(["a"], [])


def keys(*rows: tuple[object, ...]) -> list[str]:
    return [row_key(r) for r in rows]


def test_iou_counts_duplicate_rows_as_a_multiset() -> None:
    gold = keys((1,), (1,), (2,))
    assert intercode_reward(keys((1,), (1,), (2,)), gold, ordered=False) == 1.0
    # answer has one copy of (1,): ∩ = {1, 2} (2 rows), ∪ = {1, 1, 2} (3 rows)
    assert intercode_reward(keys((1,), (2,)), gold, ordered=False) == pytest.approx(2 / 3)
    # an extra row and a missing row: ∩ = 2, ∪ = 4
    assert intercode_reward(keys((1,), (1,), (3,)), gold, ordered=False) == pytest.approx(2 / 4)
    assert intercode_reward(keys((9,)), gold, ordered=False) == 0.0


def test_empty_and_failed_answers() -> None:
    assert intercode_reward([], [], ordered=True) == 1.0  # InterCode: both empty is a match
    assert intercode_reward([], keys((1,)), ordered=False) == 0.0
    assert intercode_reward(keys((1,)), [], ordered=False) == 0.0
    assert intercode_reward(None, [], ordered=False) == 0.0  # an error is never an answer


def test_row_values_compare_by_their_string_form() -> None:
    assert intercode_reward(keys((1,)), keys((1.0,)), ordered=False) == 0.0
    assert intercode_reward(keys(("1",)), keys((1,)), ordered=False) == 0.0
    assert intercode_reward(keys((None, "x")), keys((None, "x")), ordered=False) == 1.0


def test_order_matters_only_when_the_gold_query_orders() -> None:
    gold = keys(("a",), ("b",), ("c",))
    reversed_answer = keys(("c",), ("b",), ("a",))
    assert intercode_reward(reversed_answer, gold, ordered=False) == 1.0
    assert intercode_reward(reversed_answer, gold, ordered=True) == 0.0  # τ = -1
    one_swap = keys(("b",), ("a",), ("c",))
    assert intercode_reward(one_swap, gold, ordered=True) == pytest.approx((1 / 3 + 1) / 2)


def test_order_is_scored_on_the_intersection_only() -> None:
    gold = keys(("a",), ("b",), ("c",), ("d",))
    # extra row z and missing row d: IoU 3/5, and a, b, c keep the gold order (τ = 1)
    answer = keys(("z",), ("a",), ("b",), ("c",))
    assert intercode_reward(answer, gold, ordered=True) == pytest.approx(3 / 5)
    # single common row: τ undefined, the IoU stands
    assert intercode_reward(keys(("b",), ("q",)), gold, ordered=True) == pytest.approx(1 / 5)


def test_ordered_duplicates_and_success_needs_the_exact_sequence() -> None:
    gold = keys((1,), (1,), (2,))
    assert intercode_reward(keys((1,), (1,), (2,)), gold, ordered=True) == 1.0
    moved = intercode_reward(keys((1,), (2,), (1,)), gold, ordered=True)
    assert 0.0 < moved < 1.0
    assert moved == pytest.approx((kendall_tau_b(keys((1,), (2,), (1,)), gold) + 1) / 2)


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT a FROM t ORDER BY a", True),
        ("select a from t order\n  by a desc limit 3", True),
        ("SELECT a FROM t", False),
        ("SELECT a FROM (SELECT a FROM t ORDER BY a LIMIT 2)", False),
        ("SELECT a FROM t WHERE b IN (SELECT b FROM u ORDER BY b) ORDER BY a", True),
        ("SELECT 'order by x' FROM t", False),
        ('SELECT "ORDER BY" FROM t', False),
        ("SELECT a FROM t -- order by a", False),
        ("SELECT a FROM t /* order by a */", False),
        ("SELECT a FROM t UNION SELECT b FROM u ORDER BY 1", True),
        ("SELECT [order by] FROM t", False),
    ],
)
def test_orders_rows(sql: str, expected: bool) -> None:
    assert orders_rows(sql) is expected


def test_iou_reproduces_intercode_recorded_partial_rewards() -> None:
    """The released GPT-4 episodes were scored by InterCode's IoU (no order factor): ours agrees."""
    from retroact.envs.intercode_sql_data import file_db_key, gold_result, load_dataset
    from retroact.envs.sql_sandbox import SqlSandbox

    path = require_data("intercode_sql/trajectories/ic_sql_multiturn_gpt-4_10_turns.json")
    tasks = {t.id: t for t in load_dataset().tasks}
    episodes = json.loads(path.read_text(encoding="utf-8"))
    compared = 0
    for key, ep in episodes.items():
        task = tasks[key]
        history = ep["turn_history"]
        partial = [
            (o, r) for o, r in zip(history["observations"], history["rewards"], strict=True) if 0 < r < 1
        ]
        if not partial:
            continue
        with SqlSandbox.open_file(task.payload["db_path"]) as sandbox:
            gold = gold_result(file_db_key(task.payload["db_path"]), task.payload["gold"], sandbox)
        for observation, recorded in partial:
            try:
                rows = ast.literal_eval(observation)
            except (ValueError, SyntaxError):  # MySQL reprs such as Decimal('1.5') or cut-off text
                continue
            ours = intercode_reward([row_key(r) for r in rows], gold.rows, ordered=False)
            assert ours == pytest.approx(recorded), (key, observation[:80])
            compared += 1
    assert compared == 168
