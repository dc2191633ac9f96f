"""Multi-trial evaluation: run the loop on a split, write results.json and trajectories.jsonl."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from retroact.agent.loop import LoopConfig, LoopResult, run_trials
from retroact.agent.records import dump_json, write_records
from retroact.envs import list_tasks
from retroact.eval.metrics import trial_summary
from retroact.models.base import Policy


def evaluate(
    env: str,
    planner: Policy,
    reflector: Policy | None,
    *,
    split: str = "test",
    n_tasks: int | None = None,
    task_seed: int = 0,
    config: LoopConfig | None = None,
    out_dir: str | Path | None = None,
    show_progress: bool = True,
) -> dict[str, object]:
    """Evaluate a planner/reflector pair; returns (and writes, with ``out_dir``) the results dict."""
    cfg = config or LoopConfig()
    tasks = list_tasks(env, split, n_tasks, task_seed)
    start = time.perf_counter()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not show_progress,
        transient=True,
    ) as progress:
        bar = progress.add_task(f"eval {env}/{split}", total=len(tasks) * cfg.trials)
        result = run_trials(env, tasks, planner, reflector, cfg, on_episode=lambda: progress.advance(bar))
    results = results_dict(env, split, result, planner, reflector, cfg, seconds=time.perf_counter() - start)
    if out_dir is not None:
        out = Path(out_dir)
        write_records(out / "trajectories.jsonl", result.records)
        dump_json(out / "results.json", results)
    return results


def results_dict(
    env: str,
    split: str,
    result: LoopResult,
    planner: Policy,
    reflector: Policy | None,
    cfg: LoopConfig,
    *,
    seconds: float,
) -> dict[str, object]:
    per_trial_reward = result.per_trial_reward
    return {
        "env": env,
        "split": split,
        "planner": planner.info.name,
        "reflector": reflector.info.name if reflector else None,
        "n_tasks": len(result.task_ids),
        "trials": cfg.trials,
        "per_trial_reward": per_trial_reward,
        "per_trial_success": result.per_trial_success,
        **trial_summary(per_trial_reward),
        "n_errors": result.n_errors,
        "valid_action_rate": result.n_valid_actions / max(result.n_actions, 1),
        "repeat_stop_rate": result.n_repeat_stops
        / max(len([r for r in result.records if r.role == "planner"]), 1),
        "seconds": round(seconds, 2),
        "task_ids": result.task_ids,
        "config": cfg.model_dump(),
    }


def results_table(results: dict[str, object]) -> Table:
    table = Table(title=f"{results['env']} / {results['split']}: {results['n_tasks']} tasks")
    table.add_column("trial", justify="right")
    table.add_column("reward", justify="right")
    table.add_column("success", justify="right")
    rewards = results["per_trial_reward"]
    successes = results["per_trial_success"]
    assert isinstance(rewards, list) and isinstance(successes, list)
    for k, (r, s) in enumerate(zip(rewards, successes, strict=True), start=1):
        table.add_row(str(k), f"{r:.3f}", f"{s:.1%}")
    table.caption = f"IR {results['IR']:.3f}  FR {results['FR']:.3f}  AR {results['AR']:.3f}"
    return table


def print_results(results: dict[str, object], console: Console | None = None) -> None:
    (console or Console()).print(results_table(results))
