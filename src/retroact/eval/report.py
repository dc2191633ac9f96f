"""Paper-style results table (markdown) and plots (PNG) from an experiment's results.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table


def _cell(m: dict[str, Any], key: str) -> str:
    value = f"{100 * m[key]:.1f}"
    return value + (f" ± {100 * m[f'{key}_std']:.1f}" if m.get("seeds", 1) > 1 else "")


def results_markdown(results: dict[str, Any]) -> str:
    """The IR/FR/AR table (×100) plus trial-1 and last-trial success."""
    seeds = max((m["seeds"] for m in results["methods"].values()), default=1)
    lines = [
        f"{results['env']} / {results['split']}: {results['n_tasks']} tasks, {results['trials']} trials, "
        f"model `{results['model']}`, {seeds} seed(s); reward ×100"
        + (" (mean ± std over seeds)" if seeds > 1 else ""),
        "",
        "| Method | IR | FR | AR | success trial 1 | success last trial |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in results["methods"].items():
        lines.append(
            f"| {name} | {_cell(m, 'IR')} | {_cell(m, 'FR')} | {_cell(m, 'AR')} | "
            f"{100 * m['IR_success']:.1f}% | {100 * m['FR_success']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def _per_trial(values: list[float]) -> str:
    return " / ".join(f"{100 * v:.1f}" for v in values)


def eval_results_markdown(runs: list[dict[str, Any]]) -> str:
    """One row per ``retroact eval`` run (its results.json), with the command that reproduces it."""
    lines = [
        "| env / split | tasks | planner / reflector | reward ×100 per trial | success % per trial | run |",
        "|---|---:|---|---|---|---|",
    ]
    for r in runs:
        command = (
            f"retroact eval --env {r['env']} --split {r['split']} --tasks {r['n_tasks']} "
            f"--trials {r['trials']} --planner {_cli_name(r['planner'])} "
            f"--reflector {_cli_name(r['reflector'])}"
        )
        lines.append(
            f"| {r['env']} / {r['split']} | {r['n_tasks']} | {r['planner']} / {r['reflector']} | "
            f"{_per_trial(r['per_trial_reward'])} | {_per_trial(r['per_trial_success'])} | `{command}` |"
        )
    return "\n".join(lines) + "\n"


def _cli_name(policy: str | None) -> str:
    """The --planner/--reflector value a policy name came from (scripted experts are named expert:ENV)."""
    if not policy:
        return "none"
    return "expert" if policy.startswith("expert:") else policy


def results_rich_table(results: dict[str, Any]) -> Table:
    table = Table(
        title=f"{results['env']} / {results['split']}: {results['n_tasks']} tasks, {results['trials']} trials"
    )
    for col in ("Method", "IR", "FR", "AR", "success T1", "success last"):
        table.add_column(col, justify="left" if col == "Method" else "right")
    for name, m in results["methods"].items():
        table.add_row(
            name,
            _cell(m, "IR"),
            _cell(m, "FR"),
            _cell(m, "AR"),
            f"{100 * m['IR_success']:.1f}%",
            f"{100 * m['FR_success']:.1f}%",
        )
    return table


def _line_plot(
    series: dict[str, tuple[list[float], list[float]]], path: Path, *, xlabel: str, ylabel: str, title: str
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_per_trial(results: dict[str, Any], path: Path) -> Path:
    series = {
        name: (list(range(1, len(m["per_trial_reward"]) + 1)), m["per_trial_reward"])
        for name, m in results["methods"].items()
    }
    return _line_plot(
        series,
        path,
        xlabel="trial",
        ylabel="mean reward",
        title=f"Reward per trial ({results['env']}, {results['split']})",
    )


def plot_learning_curves(curves: dict[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """Train reward per RL iteration against rollout episodes, one line per run (see ``learning_curve``)."""
    series = {
        name: ([p["episodes"] for p in pts], [p["train_reward"] for p in pts])
        for name, pts in curves.items()
        if pts
    }
    if not series:
        return None
    return _line_plot(
        series,
        path,
        xlabel="environment episodes (rollout trials)",
        ylabel="train reward (mean over trials)",
        title="RL learning curve",
    )


def curves_markdown(curves: dict[str, list[dict[str, Any]]]) -> str:
    """Train reward per iteration of each run, and where each run first reaches each other run's final.

    "Reaches" compares points, so the per-point noise of the train reward (one slice of tasks per
    iteration) applies to it (``smooth_curve`` first compares trailing means instead); runs compared
    this way should roll out the same slices (same seed)."""
    curves = {name: pts for name, pts in curves.items() if pts}  # results.json may hold a run's empty curve
    if not curves:
        return ""
    names = list(curves)
    longest = max(len(pts) for pts in curves.values())
    lines = [
        "| iteration | " + " | ".join(f"{n}: episodes | {n}: train reward" for n in names) + " |",
        "|---:|" + "---:|---:|" * len(names),
    ]
    for i in range(longest):
        cells = [
            f"{curves[n][i]['episodes']} | {curves[n][i]['train_reward']:.3f}"
            if i < len(curves[n])
            else " | "
            for n in names
        ]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    lines.append("")
    for a in names:
        for b in names:
            if a == b:
                continue
            final = curves[b][-1]
            hit = next((p for p in curves[a] if p["train_reward"] >= final["train_reward"]), None)
            where = (
                f"at iteration {hit['iteration']}, {hit['episodes']} episodes "
                f"({hit['episodes'] / final['episodes']:.1%} of {b}'s {final['episodes']})"
                if hit
                else "never"
            )
            lines.append(f"- {a} reaches {b}'s final train reward ({final['train_reward']:.3f}) {where}")
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, Any], out: Path, *, command: str) -> Path:
    """``out/report.md`` with the table, the plots and the command that reproduces them."""
    out.mkdir(parents=True, exist_ok=True)
    per_trial = plot_per_trial(results, out / "per_trial_reward.png")
    curve = plot_learning_curves(results.get("learning_curves", {}), out / "rl_learning_curve.png")
    parts = [
        "# RetroAct results\n",
        f"Reproduce with `{command}` ({results['seconds']:.0f} s for the stages run in the last call).\n",
        results_markdown(results),
        f"![reward per trial]({per_trial.name})\n",
    ]
    if curve:
        parts += [f"![RL learning curve]({curve.name})\n", curves_markdown(results["learning_curves"])]
    report = out / "report.md"
    report.write_text("\n".join(parts), encoding="utf-8")
    return report
