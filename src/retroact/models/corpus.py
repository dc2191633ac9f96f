"""Text for the built-in tokenizer: what the envs' experts and prompts actually produce."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from retroact.agent.loop import LoopConfig, run_trials
from retroact.envs import get_spec, list_tasks

BUILTIN_ENVS = ("household", "hotpotqa-synth", "intercode_sql-synth")
"""Envs a tiny model trained from scratch can learn on a CPU; their text trains the tokenizer."""


def available_builtin_envs() -> list[str]:
    out = []
    for name in BUILTIN_ENVS:
        try:
            get_spec(name)
            out.append(name)
        except KeyError:
            continue
    return out


def env_corpus(envs: Sequence[str], n_tasks: int = 200, trials: int = 3, seed: int = 0) -> Iterator[str]:
    """Planner and reflector prompts and outputs of expert runs on each env's train split."""
    for name in envs:
        spec = get_spec(name)
        planner, reflector = spec.experts()
        tasks = list_tasks(name, "train", n_tasks, seed)
        for rec in run_trials(name, tasks, planner, reflector, LoopConfig(trials=trials, seed=seed)).records:
            yield rec.prompt + rec.output
