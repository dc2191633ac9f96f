"""Expert collection: evaluator filters, zero-shot prompts, stats, resume after a kill, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retroact.agent.loop import LoopConfig
from retroact.agent.records import read_records
from retroact.cli import app
from retroact.data.collect import collect
from retroact.envs import get_spec
from retroact.eval.experiment import CollectSettings
from retroact.models import load_policies


def _experts():  # type: ignore[no-untyped-def]
    return get_spec("household").experts()


def test_filters_keep_successes_and_helpful_reflections(tmp_path: Path) -> None:
    stats = collect("household", *_experts(), tmp_path, n_tasks=30, config=LoopConfig(trials=3))
    raw = read_records(tmp_path / "trajectories.jsonl")
    planner = read_records(tmp_path / "planner.jsonl")
    reflector = read_records(tmp_path / "reflector.jsonl")
    assert planner and all(r.success and r.role == "planner" and not r.error for r in planner)
    assert reflector and all(r.role == "reflector" and r.success and r.next_reward == 1.0 for r in reflector)
    failed = [r for r in raw if r.role == "planner" and not r.success]
    assert stats["dropped"]["planner"] == {"trial failed": len(failed)}
    assert stats["kept"] == {"planner": len(planner), "reflector": len(reflector)}
    assert stats["episodes"] == 30 and 0 < stats["trial1_success"] < 1
    # Zero-shot student prompts that hold the memory the planner actually had.
    for r in planner:
        assert "Reflections" not in r.prompt or r.info["memory"]
        for m in r.info["memory"]:
            assert m in r.prompt
    # Records load with `datasets`-style JSON readers: every line is a flat JSON object with `output`.
    line = json.loads((tmp_path / "planner.jsonl").read_text().splitlines()[0])
    assert {"prompt", "output", "role", "task_id", "trial", "source"} <= set(line)


def test_resume_after_a_kill_neither_loses_nor_duplicates(tmp_path: Path) -> None:
    cfg = LoopConfig(trials=2)
    full = tmp_path / "full"
    collect("household", *_experts(), full, n_tasks=12, config=cfg, chunk_size=4)
    part = tmp_path / "part"
    collect("household", *_experts(), part, n_tasks=8, config=cfg, chunk_size=4)
    # A kill in the middle of the next chunk: half of its records appended, progress.json not updated.
    extra = [
        r
        for r in read_records(full / "trajectories.jsonl")
        if r.task_id not in json.loads((part / "progress.json").read_text())["done"]
    ][:3]
    with (part / "trajectories.jsonl").open("a") as f:
        f.writelines(r.model_dump_json() + "\n" for r in extra)
        f.write('{"torn": ')
    collect("household", *_experts(), part, n_tasks=12, config=cfg, chunk_size=4)
    got = read_records(part / "trajectories.jsonl")
    want = read_records(full / "trajectories.jsonl")
    assert sorted(r.uid for r in got) == sorted(r.uid for r in want)
    assert len({r.uid for r in got}) == len(got)


def test_cli_collect_and_eval(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(
        app,
        ["collect", "--env", "household", "--tasks", "5", "--trials", "2", "--out", str(tmp_path / "data")],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "data" / "planner.jsonl").exists()
    res = runner.invoke(
        app, ["eval", "--env", "household", "--tasks", "6", "--trials", "3", "--out", str(tmp_path / "eval")]
    )
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["n_tasks"] == 6 and len(results["per_trial_reward"]) == 3
    assert (
        results["IR"] == results["per_trial_reward"][0] and results["FR"] == results["per_trial_reward"][-1]
    )
    assert "IR" in res.output and (tmp_path / "eval" / "trajectories.jsonl").exists()


def test_mistakes_are_counted_and_only_the_scripted_expert_makes_them(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["collect", "--env", "household", "--tasks", "20", "--trials", "2", "--out", str(tmp_path / "d")]
    res = runner.invoke(app, [*args, "--mistakes", "0.3"])
    assert res.exit_code == 0, res.output
    stats = json.loads((tmp_path / "d" / "stats.json").read_text())
    kept = read_records(tmp_path / "d" / "planner.jsonl")
    in_kept = sum(s.kind == "mistake" for r in kept for s in r.segments)
    assert stats["mistakes"] == {"written": stats["mistakes"]["written"], "in_kept": in_kept}
    assert stats["mistakes"]["written"] >= in_kept > 0
    res = runner.invoke(app, [*args, "--mistakes", "0.3", "--expert", "openai:gpt-4"])
    assert res.exit_code != 0 and "--mistakes" in res.output
    with pytest.raises(ValueError, match="hotpotqa expert does not take"):
        load_policies("hotpotqa", "expert", "expert", expert_options={"mistakes": 0.1})
    with pytest.raises(ValueError, match="only the scripted expert"):
        CollectSettings(expert="openai:gpt-4", mistakes=0.1)
