"""Env registry: ``make_env("household")``, ``list_tasks("household", "test", 20)``."""

from __future__ import annotations

import importlib

from retroact.envs.base import EnvSpec, PromptStyle, StepResult, Task, TextEnv, clean_action

__all__ = [
    "EnvSpec",
    "PromptStyle",
    "StepResult",
    "Task",
    "TextEnv",
    "clean_action",
    "available_envs",
    "get_spec",
    "list_tasks",
    "make_env",
    "register",
]

# Lazy so that one env's optional dependencies never break another env.
_BUILTIN = {
    "household": "retroact.envs.household:SPEC",
    "hotpotqa": "retroact.envs.hotpotqa:SPEC",
    "hotpotqa-synth": "retroact.envs.hotpotqa_synth:SPEC",
    "intercode_sql": "retroact.envs.intercode_sql:SPEC",
    "intercode_sql-synth": "retroact.envs.intercode_sql_synth:SPEC",
    "alfworld": "retroact.envs.alfworld:SPEC",
}
_REGISTRY: dict[str, EnvSpec] = {}


def register(spec: EnvSpec) -> EnvSpec:
    _REGISTRY[spec.name] = spec
    return spec


def available_envs() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def get_spec(name: str) -> EnvSpec:
    if name not in _REGISTRY:
        if name not in _BUILTIN:
            raise KeyError(f"unknown env {name!r}; available: {', '.join(available_envs())}")
        module, attr = _BUILTIN[name].split(":")
        try:
            _REGISTRY[name] = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("retroact"):
                raise KeyError(f"env {name!r} is not implemented in this version") from err
            raise
    return _REGISTRY[name]


def make_env(name: str, **options: object) -> TextEnv:
    return get_spec(name).make(**options)


def list_tasks(name: str, split: str, n: int | None = None, seed: int = 0) -> list[Task]:
    spec = get_spec(name)
    if split not in spec.splits:
        raise ValueError(f"env {name!r} has no split {split!r}; splits: {', '.join(spec.splits)}")
    return spec.tasks(split, n, seed)
