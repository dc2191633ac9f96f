"""``retroact``: the command line. Each command mirrors one stage's function and config."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="retroact",
    help="Train retrospective language agents: a planner and a reflector, jointly.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()

EnvOpt = Annotated[str, typer.Option("--env", help="Environment name (see `retroact envs`).")]
SplitOpt = Annotated[str, typer.Option("--split", help="Task split.")]
TasksOpt = Annotated[int | None, typer.Option("--tasks", min=1, help="Number of tasks (default: whole split).")]
TrialsOpt = Annotated[int, typer.Option("--trials", min=1, help="Trials per task.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Output directory.")]
MaxStepsOpt = Annotated[int | None, typer.Option("--max-steps", min=1, help="Steps per trial (env default).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for task order and sampling.")]
TempOpt = Annotated[float, typer.Option("--temperature", min=0.0, help="Sampling temperature (0 = greedy).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Most episodes per generation call.")]


def _loop_config(trials: int, max_steps: int | None, temperature: float, seed: int, batch_size: int,
                 reflect: bool = True, fewshot: bool = False):  # type: ignore[no-untyped-def]
    from retroact.agent.loop import LoopConfig

    return LoopConfig(trials=trials, max_steps=max_steps, temperature=temperature, seed=seed,
                      batch_size=batch_size, reflect=reflect, fewshot=fewshot)


@app.command("envs")
def envs_cmd() -> None:
    """List the registered environments and their splits."""
    from retroact.envs import available_envs, get_spec

    for name in available_envs():
        try:
            spec = get_spec(name)
            console.print(f"{name:22s} splits: {', '.join(spec.splits)}; max steps {spec.max_steps}")
        except KeyError as err:
            console.print(f"{name:22s} [dim]{err.args[0]}[/dim]")


@app.command("eval")
def eval_cmd(
    env: EnvOpt = "household",
    planner: Annotated[str, typer.Option(help="`expert`, `openai:MODEL`, or a model/checkpoint path.")] = "expert",
    reflector: Annotated[str, typer.Option(help="As --planner, or `none` for no reflection (ReAct).")] = "expert",
    split: SplitOpt = "test",
    tasks: TasksOpt = 20,
    trials: TrialsOpt = 3,
    out: OutOpt = Path("runs/eval"),
    max_steps: MaxStepsOpt = None,
    temperature: TempOpt = 0.0,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 32,
) -> None:
    """Evaluate a planner and reflector over several trials; prints reward per trial and IR/FR/AR."""
    from retroact.eval.evaluate import evaluate, print_results
    from retroact.models import load_policies

    planner_policy, reflector_policy = load_policies(env, planner, reflector)
    cfg = _loop_config(trials, max_steps, temperature, seed, batch_size, reflect=reflector_policy is not None,
                       fewshot=planner.startswith("openai:"))
    results = evaluate(env, planner_policy, reflector_policy, split=split, n_tasks=tasks, task_seed=seed,
                       config=cfg, out_dir=out)
    print_results(results, console)
    console.print(f"wrote {out / 'results.json'} and {out / 'trajectories.jsonl'}")


@app.command("collect")
def collect_cmd(
    env: EnvOpt = "household",
    expert: Annotated[str, typer.Option(help="`expert` (scripted), `openai:MODEL`, or a model path.")] = "expert",
    split: SplitOpt = "train",
    tasks: TasksOpt = None,
    trials: TrialsOpt = 3,
    out: OutOpt = Path("runs/data"),
    max_steps: MaxStepsOpt = None,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 32,
) -> None:
    """Run an expert as planner and reflector and keep the evaluator-approved IL samples."""
    from rich.progress import Progress

    from retroact.data.collect import collect
    from retroact.models import load_policies

    planner_policy, reflector_policy = load_policies(env, expert, expert)
    cfg = _loop_config(trials, max_steps, 0.0, seed, batch_size, fewshot=not expert == "expert")
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task(f"collect {env}/{split}", total=None)
        stats = collect(env, planner_policy, reflector_policy, out, split=split, n_tasks=tasks, task_seed=seed,
                        config=cfg, on_chunk=lambda done, total: progress.update(bar, completed=done, total=total))
    console.print(f"episodes {stats['episodes']}, trial-1 success {stats['trial1_success']:.1%}, "
                  f"kept {stats['kept']}, dropped {stats['dropped']}")
    console.print(f"wrote {out}/planner.jsonl, {out}/reflector.jsonl, {out}/stats.json")


def main() -> None:
    """Entry point: known user errors print one clear line instead of a traceback."""
    from retroact.agent.records import RecordFileError
    from retroact.config import ConfigError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except (ConfigError, RecordFileError, FileNotFoundError, ValueError, KeyError) as err:
        console.print(f"[red]error:[/red] {err.args[0] if isinstance(err, KeyError) else err}")
        sys.exit(2)


if __name__ == "__main__":
    main()
