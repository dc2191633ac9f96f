"""The text-environment contract: tasks as plain data, ``reset``/``step``, and shared helpers."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from retroact.models.base import Policy

MAX_ACTION_CHARS = 600
"""Model outputs longer than this are cut before an env parses them."""


@dataclass(frozen=True)
class Task:
    """One task: a stable id, its split, and env-specific plain data (JSON-serialisable)."""

    id: str
    split: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    observation: str
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    """``success`` (bool) is set when the trial ends; ``valid`` (bool): the env accepted the action."""


@runtime_checkable
class TextEnv(Protocol):
    """A text environment. ``reset`` starts a trial of ``task``; ``step`` never raises on bad actions."""

    def reset(self, task: Task) -> str: ...

    def step(self, action: str) -> StepResult: ...


@dataclass(frozen=True)
class PromptStyle:
    """How an env's tasks are put to the planner and the reflector (our own wording per env).

    Every planner step is one line of model text ending in a newline; ``step_prefix`` is written
    by the loop before each step (e.g. ``"> "``) so the model only writes the action line.
    """

    planner_instruction: str
    reflector_instruction: str
    step_prefix: str = "> "
    max_action_tokens: int = 48
    max_reflection_tokens: int = 96
    fewshot: str = ""
    """Planner exemplars for LLM experts only; students are zero-shot (SPEC §2.3)."""
    reflector_fewshot: str = ""
    """Reflector exemplars for LLM experts only."""


@dataclass(frozen=True)
class EnvSpec:
    """Everything the framework needs to know about one env, registered by name."""

    name: str
    make: Callable[..., TextEnv]
    """``make(**options) -> TextEnv``; options come from the config."""
    tasks: Callable[[str, int | None, int], list[Task]]
    """``tasks(split, n, seed)``: the first ``n`` tasks (all if None) of a split, deterministic per seed."""
    experts: Callable[..., tuple[Policy, Policy]]
    """``experts(**options) -> (planner, reflector)`` scripted experts."""
    prompts: PromptStyle
    max_steps: int
    memory_size: int | None = 3
    """Reflections kept in the planner's memory; None keeps all (HotpotQA)."""
    reflector_sees_memory: bool = True
    """Whether the reflector also reads the earlier reflections (household, SQL) or only τ_k (HotpotQA)."""
    splits: Sequence[str] = ("train", "test")


def clean_action(text: str) -> str:
    """The first non-empty line of a model output, stripped and length-capped."""
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line[:MAX_ACTION_CHARS]
    return ""


def seeded_sample(items: Sequence[Task], n: int | None, seed: int) -> list[Task]:
    """A deterministic subset in a seed-dependent order (the whole list shuffled when n is None)."""
    order = list(items)
    random.Random(seed).shuffle(order)
    return order if n is None else order[:n]
