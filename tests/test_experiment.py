"""The experiment harness and the demo configs: results.json shape, report, stage reuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from retroact.cli import app
from retroact.config import load_config
from retroact.eval.experiment import BUILTIN_METHODS, Experiment, ExperimentConfig
from retroact.eval.report import curves_markdown
from retroact.paths import REPO_ROOT
from retroact.train.rl import learning_curve

EXPERIMENT_CONFIGS = ("demo*.yaml", "rl-curves.yaml", "smollm2-*.yaml", "*-synth.yaml")
CONFIGS = sorted(p for g in EXPERIMENT_CONFIGS for p in (REPO_ROOT / "configs").glob(g)) + sorted(
    (REPO_ROOT / "configs" / "paper").glob("*.yaml")
)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_experiment_configs_are_valid(path: Path) -> None:
    cfg = load_config(path, ExperimentConfig)
    assert cfg.method_specs()


def test_paper_configs_cover_every_method() -> None:
    for path in (REPO_ROOT / "configs" / "paper").glob("*.yaml"):
        names = {m.name for m in load_config(path, ExperimentConfig).method_specs()}
        assert names == set(BUILTIN_METHODS) - {"Expert"}, path


TINY = {
    "env": "household",
    "tiny": {"vocab_size": 400, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
    "collect": {"tasks": 12, "trials": 2},
    "il": {"finetune": "full", "epochs": 1, "batch_size": 8, "num_threads": 1},
    "rl": {
        "iterations": 1,
        "tasks_per_iteration": 2,
        "trials": 2,
        "max_steps": 2,
        "epochs": 1,
        "eval_tasks": 0,
        "num_threads": 1,
    },
    "eval": {"tasks": 3, "trials": 2, "max_steps": 2},
    "methods": ["Expert", "SFT", "IL", "RetroAct"],
}


def test_experiment_writes_results_report_and_reuses_stages(tmp_path: Path) -> None:
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(app, ["experiment", str(config), "--out", str(out)])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert results["env"] == "household" and results["model"] == "tiny"
    assert list(results["methods"]) == ["Expert", "SFT", "IL", "RetroAct"]
    for m in results["methods"].values():
        assert {"IR", "FR", "AR", "per_trial_reward", "seeds"} <= set(m) and len(m["per_trial_reward"]) == 2
    assert results["methods"]["SFT"]["IR"] == results["methods"]["SFT"]["FR"]  # no reflection: trials repeat
    assert "RetroAct" in results["learning_curves"]
    report = (out / "report.md").read_text()
    assert "| RetroAct |" in report and (out / "per_trial_reward.png").stat().st_size > 0
    assert (out / "rl_learning_curve.png").exists()
    first = results["learning_curves"]["RetroAct"][0]
    assert f"| 1 | {first['episodes']} | {first['train_reward']:.3f} |" in report  # the curve's table
    stamps = {p: p.stat().st_mtime for p in out.glob("seed0/*/*") if p.is_file()}
    res = runner.invoke(app, ["experiment", str(config), "--out", str(out)])
    assert res.exit_code == 0 and "stage" not in res.output  # every stage reused
    assert {p: p.stat().st_mtime for p in stamps} == stamps
    # Another output directory on the same stages: nothing re-runs, nothing of OUT is rewritten.
    other = tmp_path / "other"
    res = runner.invoke(app, ["experiment", str(config), "--out", str(other), "--stages", str(out)])
    assert res.exit_code == 0 and "stage" not in res.output, res.output
    assert {p: p.stat().st_mtime for p in stamps} == stamps and not (other / "seed0").exists()
    again = json.loads((other / "results.json").read_text())
    assert again["methods"] == results["methods"] and again["learning_curves"] == results["learning_curves"]
    assert f"--out {other} --stages {out}" in (other / "report.md").read_text()
    shared = ["experiment", str(config), "--out", str(other), "--stages", str(out)]
    res = runner.invoke(app, [*shared, "--fresh"])
    assert res.exit_code != 0 and "--fresh cannot be combined with --stages" in res.output


def test_readme_results_block_is_replaced(tmp_path: Path) -> None:
    results = {
        "env": "household",
        "split": "test",
        "n_tasks": 2,
        "trials": 2,
        "model": "tiny",
        "methods": {
            "IL": {
                "IR": 0.5,
                "FR": 1.0,
                "AR": 0.75,
                "IR_std": 0,
                "FR_std": 0,
                "AR_std": 0,
                "seeds": 1,
                "IR_success": 0.5,
                "FR_success": 1.0,
            }
        },
    }
    (tmp_path / "r.json").write_text(json.dumps(results))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nSTALE TABLE\n<!-- results:end -->\nrest\n")
    expert = "expert:hotpotqa"
    single = {"env": "hotpotqa", "split": "test", "n_tasks": 100, "trials": 3, "planner": expert,
              "reflector": expert, "per_trial_reward": [0.654, 1.0, 1.0], "per_trial_success": [0.65, 1, 1]}
    (tmp_path / "e.json").write_text(json.dumps(single))
    args = ["readme-results", str(tmp_path / "r.json"), str(tmp_path / "e.json"), "--readme", str(readme)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    text = readme.read_text()
    assert "STALE TABLE" not in text and "| IL | 50.0 | 100.0 | 75.0 |" in text and text.endswith("rest\n")
    row = f"| hotpotqa / test | 100 | {expert} / {expert} | 65.4 / 100.0 / 100.0 | 65.0 / 100.0 / 100.0 |"
    assert row in text
    command = "--env hotpotqa --split test --tasks 100 --trials 3 --planner expert --reflector expert"
    assert f"`retroact eval {command}`" in text
    two = CliRunner().invoke(app, [*args, "--command", "a", "--command", "b"])
    assert isinstance(two.exception, ValueError)  # main() prints it as one error line
    assert "1 experiment results but 2 --command values" in str(two.exception)


def test_an_evaluation_is_redone_when_a_setting_it_depends_on_changes(tmp_path: Path) -> None:
    def keys(**change: object) -> dict[str, str]:
        exp = Experiment(ExperimentConfig.model_validate({**TINY, **change}), tmp_path)
        return {m.name: json.dumps(exp.eval_inputs(m), sort_keys=True) for m in exp.cfg.method_specs()}

    base = keys()
    longer_rl = keys(rl={**TINY["rl"], "iterations": 2})
    assert longer_rl["RetroAct"] != base["RetroAct"]
    assert all(longer_rl[m] == base[m] for m in ("Expert", "SFT", "IL"))
    more_il = keys(il={**TINY["il"], "epochs": 2})
    assert more_il["Expert"] == base["Expert"]
    assert all(more_il[m] != base[m] for m in ("SFT", "IL", "RetroAct"))
    other_eval = keys(eval={**TINY["eval"], "tasks": 4})
    assert all(other_eval[m] != base[m] for m in base)


def test_stage_paths_follow_the_model_and_not_the_stages_location(tmp_path: Path) -> None:
    def stages(at: Path, **tiny: int) -> list[Path]:
        cfg = ExperimentConfig.model_validate({**TINY, "tiny": {**TINY["tiny"], **tiny}})
        exp = Experiment(cfg, tmp_path / "out", stages=at)
        data = exp.data_path(0)
        return [exp.tiny_model_path(), data, exp.il_path(0, {}, data), exp.rl_path(0, cfg.method_specs()[-1])]

    one, two = stages(tmp_path / "a", num_layers=1), stages(tmp_path / "a", num_layers=2)
    # Another tiny model: its own model directory, IL and RL stages, on the same expert data.
    assert one[1] == two[1] and one[0] != two[0] and one[2] != two[2] and one[3] != two[3]
    # A moved stages directory keeps its stage names (keys name earlier stages by directory name).
    moved = stages(tmp_path / "b" / "c", num_layers=1)
    assert [p.relative_to(tmp_path / "a") for p in one] == [p.relative_to(tmp_path / "b/c") for p in moved]


def _fake_run(run: Path, rewards: list[list[float]], episodes: list[int]) -> Path:
    """An RL run directory whose metrics.jsonl has these per-trial train rewards and episodes."""
    run.mkdir(parents=True)
    lines = [{"event": "start"}] + [
        {"event": "iteration", "iteration": i, "train": {"per_trial_reward": r, "episodes": e}}
        for i, (r, e) in enumerate(zip(rewards, episodes, strict=True))
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def test_curves_compare_runs_by_episodes(tmp_path: Path) -> None:
    off = _fake_run(tmp_path / "off", [[0.1, 0.2], [0.3, 0.3], [0.4, 0.6]], [10, 10, 10])
    on = _fake_run(tmp_path / "on", [[0.1, 0.2], [0.1, 0.3], [0.2, 0.4], [0.25, 0.35]], [10, 10, 10, 10])
    plot = tmp_path / "plots" / "curve.png"
    res = CliRunner().invoke(
        app, ["curves", str(off), str(on), "--name", "off", "--name", "on", "--plot", str(plot)]
    )
    assert res.exit_code == 0, res.output
    # Mean over trials per iteration, cumulative episodes; a row past the shorter run's end is blank.
    assert "| 2 | 20 | 0.300 | 20 | 0.200 |" in res.output
    assert "| 4 |  |  | 40 | 0.300 |" in res.output
    # on's final is 0.300: off first reaches it at iteration 2 (20 of on's 40 episodes).
    reach = "off reaches on's final train reward (0.300) at iteration 2, 20 episodes (50.0% of on's 40)"
    assert reach in res.output
    assert "on reaches off's final train reward (0.500) never" in res.output
    assert plot.stat().st_size > 0
    missing = CliRunner().invoke(app, ["curves", str(tmp_path / "nowhere")])
    assert isinstance(missing.exception, ValueError) and "nowhere/metrics.jsonl: no such file" in str(
        missing.exception
    )
    # A run being written (or killed mid-line) has a torn last line: the finished iterations are read.
    with (on / "metrics.jsonl").open("a") as f:
        f.write('{"event": "iter')
    assert [p["iteration"] for p in learning_curve(on)] == [1, 2, 3, 4]
    # An older results.json can hold a method's empty curve: it is left out, not an error.
    assert "| 1 | 10 | 0.150 |" in curves_markdown({"empty": [], "off": learning_curve(off)})
    names = CliRunner().invoke(app, ["curves", str(off), str(on), "--name", "x"])
    assert names.exit_code != 0 and "give one --name per run" in names.output
    # Runs under one label are averaged per iteration (seeds), up to the shortest of them.
    off2 = _fake_run(tmp_path / "off2", [[0.1, 0.1], [0.1, 0.1]], [20, 20])
    seeds = CliRunner().invoke(
        app, ["curves", str(off), str(off2), str(on), "--name", "off", "--name", "off", "--name", "on"]
    )
    assert seeds.exit_code == 0, seeds.output
    assert "off: mean of 2 runs over their first 2 iterations" in seeds.output
    assert (
        "| 1 | 15 | 0.125 | 10 | 0.150 |" in seeds.output
        and "| 2 | 30 | 0.200 | 20 | 0.200 |" in seeds.output
    )
    assert "| 3 |  |  | 30 | 0.300 |" in seeds.output
    # --smooth: trailing means (the first points average what there is); "reaches" uses them too.
    labelled = [str(off), str(on), "--name", "off", "--name", "on"]
    smooth = CliRunner().invoke(app, ["curves", *labelled, "--smooth", "2"])
    assert smooth.exit_code == 0, smooth.output
    assert "train reward: trailing mean over 2 iterations" in smooth.output
    assert "| 1 | 10 | 0.150 | 10 | 0.150 |" in smooth.output
    assert "| 2 | 20 | 0.225 | 20 | 0.175 |" in smooth.output
    reach = "off reaches on's final train reward (0.300) at iteration 3, 30 episodes (75.0% of on's 40)"
    assert reach in smooth.output
    bad = CliRunner().invoke(app, ["curves", str(off), "--smooth", "0"])
    assert bad.exit_code != 0 and "--smooth" in bad.output
    # Without labels, two runs with the same directory name would be averaged silently: refused.
    twins = [str(_fake_run(tmp_path / d / "run", [[0.1, 0.1]], [10])) for d in ("a", "b")]
    same = CliRunner().invoke(app, ["curves", *twins])
    assert same.exit_code != 0 and "same directory name need --name" in same.output
