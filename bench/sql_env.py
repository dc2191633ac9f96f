"""Throughput of the InterCode-SQL env: the scripted expert's multi-trial rollout over the train split.

Runs the real loop (``run_trials``) with the expert and times every ``reset``/``step`` call
inside the env, so the figure is env work only (SQLite, parsing, formatting, reward), not
loop or policy overhead. The loop's end-to-end rate is shown too. Prints a table, then the
figure (env steps per second) on the last line.

    .venv/bin/python bench/sql_env.py [--env intercode_sql-synth] [--split train] [--trials 3] [--n 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from retroact.agent.loop import LoopConfig, run_trials
from retroact.envs import StepResult, Task, TextEnv, get_spec, list_tasks


class TimedEnv:
    """Wraps an env and adds the wall time of its calls to a shared counter."""

    def __init__(self, env: TextEnv, clock: dict[str, float]) -> None:
        self.env, self.clock = env, clock

    def reset(self, task: Task) -> str:
        start = time.perf_counter()
        try:
            return self.env.reset(task)
        finally:
            self.clock["reset_s"] += time.perf_counter() - start
            self.clock["resets"] += 1

    def step(self, action: str) -> StepResult:
        start = time.perf_counter()
        try:
            return self.env.step(action)
        finally:
            self.clock["step_s"] += time.perf_counter() - start
            self.clock["steps"] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="intercode_sql", choices=["intercode_sql", "intercode_sql-synth"])
    parser.add_argument("--split", default="train")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--n", type=int, default=None, help="first n tasks of the split (default: all)")
    args = parser.parse_args()

    spec = get_spec(args.env)
    clock = {"reset_s": 0.0, "step_s": 0.0, "resets": 0, "steps": 0}
    timed = dataclasses.replace(spec, make=lambda **opts: TimedEnv(spec.make(**opts), clock))
    tasks = list_tasks(args.env, args.split, args.n)
    start = time.perf_counter()
    result = run_trials(timed, tasks, *spec.experts(), LoopConfig(trials=args.trials))
    wall = time.perf_counter() - start

    env_s = clock["reset_s"] + clock["step_s"]
    rows = [
        ("env", args.env),
        ("split / tasks", f"{args.split} / {len(tasks)}"),
        ("trials", args.trials),
        ("episodes (resets)", int(clock["resets"])),
        ("env steps", int(clock["steps"])),
        ("success per trial", " ".join(f"{s:.3f}" for s in result.per_trial_success)),
        ("reward per trial", " ".join(f"{r:.3f}" for r in result.per_trial_reward)),
        ("time in env.reset (s)", f"{clock['reset_s']:.3f}"),
        ("time in env.step (s)", f"{clock['step_s']:.3f}"),
        ("mean env.step (ms)", f"{1000 * clock['step_s'] / max(clock['steps'], 1):.3f}"),
        ("loop wall time (s)", f"{wall:.3f}"),
        ("loop steps/s (end to end)", f"{clock['steps'] / wall:.0f}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(f"env steps/s: {clock['steps'] / env_s:.0f}")


if __name__ == "__main__":
    main()
