"""InterCode-SQL's reward: multiset IoU of result rows, scaled by rank agreement where order matters.

Definition (InterCode ``SqlEnv.get_reward``, with the scaling SPEC §6 states):

* every row becomes ``str(tuple(row))``; A (answer) and G (gold) are multisets of these strings;
* ``IoU = |A ∩ G| / |A ∪ G|`` with multiset counts (min for ∩, max for ∪); both empty gives 1;
* when the gold query orders its rows and ``A ∩ G`` is not empty, the rows of the intersection
  are listed in the answer's order and in the gold order (each copy of a duplicated row counted
  once, first come first taken) and τ is Kendall's τ-b between the two lists taken as paired
  observations, values compared as strings (what ``scipy.stats.kendalltau`` does on them);
  the reward is ``IoU × (τ + 1) / 2``. An undefined τ (fewer than two distinct values) scales by 1.

Differences from InterCode's code, on purpose (see docs/intercode_sql.md): it multiplies by τ
itself and rounds to 2 decimals (negative rewards are possible there), and it applies τ even
when the gold query has no ORDER BY, where MySQL's row order is arbitrary.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Sequence


def row_key(row: Sequence[object]) -> str:
    """The string a row is compared by (InterCode stringifies tuples to avoid type clashes)."""
    return str(tuple(row))


def kendall_tau_b(x: Sequence[str], y: Sequence[str]) -> float:
    """Kendall's τ-b of paired observations ``(x[i], y[i])``; NaN when a side has no two distinct values.

    O(n log n) (Knight's method): sort pairs by (x, y), then count the discordant pairs as the
    swaps a merge sort of the y column needs.
    """
    if len(x) != len(y):
        raise ValueError(f"kendall_tau_b needs equal lengths, got {len(x)} and {len(y)}")
    n = len(x)
    n0 = n * (n - 1) // 2
    pairs = sorted(zip(_ranks(x), _ranks(y), strict=True))
    ties_x, ties_y, ties_xy = _tied_pairs(x), _tied_pairs(y), _tied_pairs(pairs)
    discordant = _count_inversions([p[1] for p in pairs])
    denom = math.sqrt((n0 - ties_x) * (n0 - ties_y))
    if denom == 0:
        return math.nan
    concordant_minus_discordant = n0 - ties_x - ties_y + ties_xy - 2 * discordant
    return concordant_minus_discordant / denom


def _ranks(values: Sequence[str]) -> list[int]:
    order = {v: i for i, v in enumerate(sorted(set(values)))}
    return [order[v] for v in values]


def _tied_pairs(values: Sequence[Hashable]) -> int:
    """Number of pairs of equal values."""
    return sum(c * (c - 1) // 2 for c in Counter(values).values())


def _count_inversions(seq: Sequence[int]) -> int:
    """Pairs ``i < j`` with ``seq[i] > seq[j]``, counted by a bottom-up merge sort."""
    values, buf = list(seq), list(seq)
    n = len(values)
    swaps = 0
    width = 1
    while width < n:
        for lo in range(0, n, 2 * width):
            mid, hi = min(lo + width, n), min(lo + 2 * width, n)
            i, j, k = lo, mid, lo
            while i < mid and j < hi:
                if values[j] < values[i]:
                    buf[k] = values[j]
                    swaps += mid - i
                    j += 1
                else:
                    buf[k] = values[i]
                    i += 1
                k += 1
            buf[k:hi] = values[i:mid] if i < mid else values[j:hi]
        values, buf = buf, values
        width *= 2
    return swaps


def _in_intersection(items: Sequence[str], common: Counter[str]) -> list[str]:
    """Items of ``items`` in their order, each kept while the intersection still has a copy of it."""
    left = common.copy()
    kept = []
    for item in items:
        if left[item] > 0:
            left[item] -= 1
            kept.append(item)
    return kept


def intercode_reward(answer: Sequence[str] | None, gold: Sequence[str], *, ordered: bool) -> float:
    """Reward of an answer's row keys against the gold row keys (see module doc).

    ``answer`` is None when the latest execution failed or nothing was executed: reward 0.
    """
    if answer is None:
        return 0.0
    if not answer and not gold:
        return 1.0
    got, want = Counter(answer), Counter(gold)
    common = got & want
    reward = sum(common.values()) / sum((got | want).values())
    if ordered and common:
        tau = kendall_tau_b(_in_intersection(answer, common), _in_intersection(gold, common))
        if not math.isnan(tau):
            reward *= (tau + 1) / 2
    return reward


_STRING_OR_COMMENT = re.compile(
    r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|`[^`]*`|\[[^\]]*\]|--[^\n]*|/\*.*?\*/", re.S
)
_ORDER_BY = re.compile(r"\border\s+by\b", re.I)


def mask_literals(sql: str) -> str:
    """``sql`` with quoted strings, quoted names and comments blanked out; same length, same offsets."""
    return _STRING_OR_COMMENT.sub(lambda m: " " * len(m.group()), sql)


def outer_text(sql: str) -> str:
    """:func:`mask_literals`, and everything inside parentheses blanked too (same offsets)."""
    depth = 0
    out = []
    for ch in mask_literals(sql):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(depth - 1, 0)
            out.append(" ")
            continue
        out.append(ch if depth == 0 else " ")
    return "".join(out)


def orders_rows(sql: str) -> bool:
    """Whether a query's outermost SELECT sorts its rows (an ORDER BY outside any parentheses)."""
    return bool(_ORDER_BY.search(outer_text(sql)))
