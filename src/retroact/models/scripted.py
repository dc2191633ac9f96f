"""Scripted experts behind the :class:`~retroact.models.base.Policy` interface."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from retroact.models.base import (
    Generation,
    GenRequest,
    PlannerView,
    PolicyInfo,
    ReflectorView,
    SamplingParams,
    SegmentKind,
)

Mistake = Callable[[PlannerView, random.Random], "str | None"]
"""A wrong line a student would plausibly write at this point of the trial, or None if there is none."""


class ScriptedPolicy:
    """Wraps a function ``view -> text`` (one planner action line, or one reflection).

    The function sees only the request's view. An exception in it becomes an ``error``
    generation, so one bad episode never stops a run.

    With a ``mistake`` function and ``mistake_rate`` p > 0, each planner step writes that function's
    line instead with probability p (where it has one), marked as a mistake: the env answers it, the
    expert recovers on the next step, and IL trains on the recovery but never on the mistake (the
    DART idea: demonstrations from the states a student's errors lead to). The draw is seeded by
    ``seed``, task id, trial and step, so a collection repeats exactly, resumed or not.
    """

    def __init__(
        self,
        name: str,
        act: Callable[[PlannerView | ReflectorView], str],
        *,
        mistake: Mistake | None = None,
        mistake_rate: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= mistake_rate < 1.0:
            raise ValueError(f"mistake_rate must be in [0, 1), got {mistake_rate}")
        if mistake_rate and mistake is None:
            raise ValueError(f"{name} has no mistake function; mistake_rate must be 0")
        self.info = PolicyInfo(name=name)
        self._act, self._mistake, self.mistake_rate, self.seed = act, mistake, mistake_rate, seed

    @property
    def tokenized(self) -> bool:
        return False

    def encode(self, text: str, kind: SegmentKind) -> list[int] | None:
        return None

    def generate(self, requests: Sequence[GenRequest], sampling: SamplingParams) -> list[Generation]:
        out = []
        for req in requests:
            try:
                wrong = self._wrong_line(req.view)
                text = wrong if wrong is not None else self._act(req.view)
                out.append(Generation(text=text.strip().replace("\n", " ") + "\n", mistake=wrong is not None))
            except Exception as err:  # noqa: BLE001 - an expert bug must not kill the run
                out.append(Generation(text="", finish_reason="error", error=f"{type(err).__name__}: {err}"))
        return out

    def _wrong_line(self, view: PlannerView | ReflectorView) -> str | None:
        if not self.mistake_rate or self._mistake is None or not isinstance(view, PlannerView):
            return None
        rng = random.Random(f"{self.seed}/{view.task.id}/{view.trial}/{len(view.history)}")
        return self._mistake(view, rng) if rng.random() < self.mistake_rate else None
