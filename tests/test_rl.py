"""Stage 2 end to end on the tiny model: buffer, behaviour log-probs, ablations, kill and resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from retroact.agent.loop import LoopConfig
from retroact.agent.records import read_records
from retroact.data.collect import collect
from retroact.envs import get_spec
from retroact.models.checkpoint import CheckpointManifest, load_manifest, save_manifest
from retroact.models.hf import HFPolicy
from retroact.models.logprobs import collate, token_logprobs
from retroact.train.il import ILConfig, train_il
from retroact.train.rl import RLConfig, RLError, train_rl
from tests.tiny import make_data_model

# Small everything: an untrained model writes long junk lines, so steps and tokens are capped.
RL_BASE = dict(
    tasks_per_iteration=3,
    trials=2,
    max_steps=3,
    epochs=1,
    batch_size=2,
    il_batch_size=2,
    eval_tasks=0,
    rollout_batch_size=8,
    rewards={"drop_zero_planner": False, "drop_zero_delta": False},
)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("rl")
    planner, reflector = get_spec("household").experts()
    data = tmp / "data"
    collect("household", planner, reflector, data, n_tasks=16, config=LoopConfig(trials=2))
    model = make_data_model(tmp, data)
    il = ILConfig(finetune="lora", epochs=1, batch_size=4, lora={"r": 4, "alpha": 8})
    ckpt = tmp / "il"
    train_il(data, model, ckpt, il, progress=False)
    shared = tmp / "il-shared"
    train_il(data, model, shared, il.model_copy(update={"shared": True}), progress=False)
    return data, ckpt, shared


def _cfg(**kw: object) -> RLConfig:
    return RLConfig.model_validate({**RL_BASE, **kw})


def test_iterations_fill_the_buffer_and_log_metrics(stage1: tuple[Path, Path, Path], tmp_path: Path) -> None:
    data, ckpt, _ = stage1
    history = train_rl(ckpt, data, tmp_path / "run", _cfg(iterations=2, eval_tasks=2, eval_trials=1))
    assert [h["iteration"] for h in history] == [0, 1]
    for key in ("loss_rl", "loss_il", "mean_ratio", "clipped_fraction", "entropy", "buffer_records", "eval"):
        assert key in history[-1]
    assert history[-1]["optimizer_steps"] > 0
    assert set(history[-1]["train"]) >= {
        "per_trial_reward",
        "per_trial_success",
        "valid_action_rate",
        "repeated_action_rate",
    }
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [0, 1]
    versions = {r.adapter_version for r in read_records(tmp_path / "run" / "buffer" / "iter_0001.jsonl")}
    assert versions == {1}
    assert history[-1]["buffer_records"] == sum(
        len(read_records(f)) for f in (tmp_path / "run" / "buffer").glob("*.jsonl")
    )
    policy = HFPolicy.load(tmp_path / "run" / "latest" / "ckpt")
    assert policy.info.version == 2
    # A finished run called again does nothing more, also when it was saved before a setting existed.
    state_file = tmp_path / "run" / "latest" / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["warmup_steps"]
    state_file.write_text(json.dumps(state))
    assert train_rl(ckpt, data, tmp_path / "run", _cfg(iterations=2, eval_tasks=2, eval_trials=1)) == []
    with pytest.raises(RLError, match="different settings"):
        train_rl(
            ckpt, data, tmp_path / "run", _cfg(iterations=2, eval_tasks=2, eval_trials=1, warmup_steps=5)
        )


def test_a_checkpoint_without_a_reflector(stage1: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """LoRA: the reflector runs the base model and only the planner trains; full models: refused."""
    data, ckpt, _ = stage1
    manifest = load_manifest(ckpt)
    ckpt_lora = tmp_path / "lora-planner-only"
    shutil.copytree(ckpt, ckpt_lora)
    shutil.rmtree(ckpt_lora / "reflector")
    save_manifest(ckpt_lora, manifest.model_copy(update={"roles": {"planner": "planner"}}))
    history = train_rl(ckpt_lora, data, tmp_path / "run-lora", _cfg())
    assert history[-1]["optimizer_steps"] > 0
    assert load_manifest(tmp_path / "run-lora" / "latest" / "ckpt").roles == {"planner": "planner"}

    base = manifest.base_model
    ckpt_full = tmp_path / "planner-only"
    shutil.copytree(base, ckpt_full / "planner")
    shutil.copytree(ckpt / "tokenizer", ckpt_full / "tokenizer")
    roles = {"planner": "planner"}
    save_manifest(ckpt_full, CheckpointManifest(base_model=base, finetune="full", roles=roles))
    with pytest.raises(RLError, match="planner-only: no reflector model; RL of full models needs both roles"):
        train_rl(ckpt_full, data, tmp_path / "run", _cfg())


def test_warmup_raises_the_lr_linearly_over_the_first_steps(
    stage1: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    data, ckpt, _ = stage1
    history = train_rl(ckpt, data, tmp_path / "run", _cfg(iterations=2, lr=1e-3, warmup_steps=1000))
    steps = [h["optimizer_steps"] for h in history]
    assert all(steps)
    # After k steps the next step's lr is lr * (k + 1) / warmup_steps.
    assert history[0]["lr"] == pytest.approx(1e-3 * (steps[0] + 1) / 1000)
    assert history[1]["lr"] == pytest.approx(1e-3 * (sum(steps) + 1) / 1000)
    plain = train_rl(ckpt, data, tmp_path / "plain", _cfg(iterations=1, lr=1e-3))
    assert plain[0]["lr"] == 1e-3


def test_behaviour_logprobs_match_a_teacher_forced_recompute(
    stage1: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    data, ckpt, _ = stage1
    train_rl(ckpt, data, tmp_path / "run", _cfg(iterations=1))
    records = read_records(tmp_path / "run" / "buffer" / "iter_0000.jsonl")
    behaviour = HFPolicy.load(ckpt)  # version 0: the adapters that sampled iteration 0
    for role in ("planner", "reflector"):
        recs = [r for r in records if r.role == role and r.output_ids][:3]
        assert recs, role
        with behaviour._role_model(role) as model:  # noqa: SLF001 - the policy's own adapter switch
            logp, _ = token_logprobs(
                model, collate([r.prompt_ids for r in recs], [r.output_ids for r in recs], behaviour.pad_id)
            )
        for i, r in enumerate(recs):
            mask = torch.tensor(r.loss_mask, dtype=torch.bool)
            got = logp[i, : len(r.output_ids)][mask]
            want = torch.tensor(r.behaviour_logprobs)[mask]
            assert torch.allclose(got, want, atol=1e-4), role


@pytest.mark.parametrize(
    "overrides",
    [
        {"mode": "on_policy"},
        {"objective": "ppo_clip"},
        {"optimise": "planner"},
        {"optimise": "reflector"},
        {"lam": 0.0},
        {"max_staleness": 0},
        {"rewards": {"reflector_reward": "paper"}},
    ],
    ids=["on-policy", "ppo_clip", "planner-only", "reflector-only", "lambda0", "staleness0", "paper-reward"],
)
def test_every_ablation_runs(stage1: tuple[Path, Path, Path], tmp_path: Path, overrides: dict) -> None:
    data, ckpt, _ = stage1
    history = train_rl(ckpt, data, tmp_path / "run", _cfg(iterations=1, **overrides))
    samples = history[0]["samples"]
    if overrides.get("optimise") == "planner":
        assert history[0]["optimizer_steps"] == -(-samples.get("planner", 0) // 2)
    assert history[0]["skipped_steps"] == 0


def test_shared_adapter_run(stage1: tuple[Path, Path, Path], tmp_path: Path) -> None:
    data, _, shared = stage1
    history = train_rl(shared, data, tmp_path / "run", _cfg(iterations=1))
    assert history[0]["optimizer_steps"] > 0
    manifest = json.loads((tmp_path / "run" / "latest" / "ckpt" / "retroact.json").read_text())
    assert manifest["roles"] == {"planner": "shared", "reflector": "shared"} and manifest["version"] == 1


def _spawn(ckpt: Path, data: Path, out: Path, config: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "retroact.cli",
        "rl",
        "--init",
        str(ckpt),
        "--data",
        str(data),
        "--out",
        str(out),
        "--config",
        str(config),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def _kill_when(proc: subprocess.Popen[bytes], ready: callable, timeout: float = 120) -> None:  # type: ignore[valid-type]
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.01)
    proc.kill()
    pytest.fail("the run ended before the moment to kill it")


def test_kill_during_rollout_and_update_loses_and_duplicates_nothing(
    stage1: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    data, ckpt, _ = stage1
    # Enough update steps (batch 1, 3 epochs) that the update phase is long enough to be hit.
    # Warm-up spans both iterations, so the resumed run must also restore the lr schedule's position.
    cfg = _cfg(
        iterations=2,
        tasks_per_iteration=2,
        max_steps=2,
        epochs=3,
        batch_size=1,
        num_threads=1,
        warmup_steps=500,
    )
    config = tmp_path / "rl.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump()))
    torch.set_num_threads(1)
    reference = tmp_path / "reference"
    train_rl(ckpt, data, reference, cfg)

    run = tmp_path / "run"
    buffer = run / "buffer"
    state = run / "latest" / "state.json"
    # 1) during the update of iteration 0: its buffer file exists, no iteration is finished yet
    _kill_when(_spawn(ckpt, data, run, config), lambda: (buffer / "iter_0000.jsonl").exists())
    assert not state.exists()
    # 2) during the rollout of iteration 1: iteration 0 finished, iteration 1's file not written yet
    _kill_when(
        _spawn(ckpt, data, run, config),
        lambda: state.exists() and json.loads(state.read_text())["iteration"] == 1,
    )
    assert not (buffer / "iter_0001.jsonl").exists()
    train_rl(ckpt, data, run, cfg)

    for k in range(2):
        got = read_records(buffer / f"iter_{k:04d}.jsonl")
        want = read_records(reference / "buffer" / f"iter_{k:04d}.jsonl")
        assert len({r.uid for r in got}) == len(got)
        # Same records as the uninterrupted run (the source names the run directory, which differs).
        assert [r.model_dump(exclude={"source"}) for r in got] == [
            r.model_dump(exclude={"source"}) for r in want
        ]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [0, 1]
    reference_lines = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [x["lr"] for x in lines] == [x["lr"] for x in reference_lines]
