"""Scripted experts behind the :class:`~retroact.models.base.Policy` interface."""

from __future__ import annotations

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


class ScriptedPolicy:
    """Wraps a function ``view -> text`` (one planner action line, or one reflection).

    The function sees only the request's view. An exception in it becomes an ``error``
    generation, so one bad episode never stops a run.
    """

    def __init__(self, name: str, act: Callable[[PlannerView | ReflectorView], str]) -> None:
        self.info = PolicyInfo(name=name)
        self._act = act

    @property
    def tokenized(self) -> bool:
        return False

    def encode(self, text: str, kind: SegmentKind) -> list[int] | None:
        return None

    def generate(self, requests: Sequence[GenRequest], sampling: SamplingParams) -> list[Generation]:
        out = []
        for req in requests:
            try:
                text = self._act(req.view).strip().replace("\n", " ") + "\n"
                out.append(Generation(text=text))
            except Exception as err:  # noqa: BLE001 - an expert bug must not kill the run
                out.append(Generation(text="", finish_reason="error", error=f"{type(err).__name__}: {err}"))
        return out
