"""Training on two gloo CPU processes (`accelerate launch`) gives the one-process result.

One launch runs `retroact il` then `retroact rl` through the CLI with the shipped
configs/accelerate/cpu-2proc.yaml; the references run here in one process with the same global
batches. LoRA dropout is 0 because dropout masks are drawn per process (equal in distribution,
not bit for bit); everything else must agree up to float summation order (atol 1e-5).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import yaml
from safetensors.torch import load_file

from retroact.agent.loop import LoopConfig
from retroact.agent.records import TrajectoryRecord, read_records, write_records
from retroact.data.collect import collect
from retroact.envs import get_spec
from retroact.train.distributed import SINGLE, DistributedError, ProcessGroup, process_group
from retroact.train.fsdp import FSDPSettings
from retroact.train.il import ILConfig, train_il
from retroact.train.rl import RLConfig, train_rl
from tests.test_rl import RL_BASE
from tests.tiny import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5
# Steps of two micro-batches that each rank splits, and an RL update with an IL term.
IL = {
    "epochs": 2,
    "lr": 3e-3,
    "batch_size": 3,
    "grad_accum": 2,
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "num_threads": 1,
}
RL = {**RL_BASE, "iterations": 1, "batch_size": 3, "il_batch_size": 3, "lr": 3e-3, "num_threads": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adapters(ckpt: Path) -> dict[str, torch.Tensor]:
    return {
        f"{unit}/{k}": v
        for unit in ("planner", "reflector")
        for k, v in load_file(ckpt / unit / "adapter_model.safetensors").items()
    }


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_share_batches_splits_each_step_once_and_keeps_micro_batches() -> None:
    batches = [[1, 2, 3], [4, 5], [6]]
    shares = [ProcessGroup(r, 4).share_batches(batches) for r in range(4)]
    assert shares == [[([1], 1.0)], [([2, 3], 1.0)], [([4], 1.0)], [([5], 1.0), ([6], 1.0)]]
    assert SINGLE.share_batches(batches) == [(b, 1.0) for b in batches]
    assert ProcessGroup(1, 4).share([7]) == []
    assert ProcessGroup(1, 4).share_for_pass([7]) == ([], 1.0)
    assert SINGLE.rank_seed(5) == 5 != ProcessGroup(1, 2).rank_seed(5)


def test_under_fsdp_every_rank_runs_as_many_passes_with_weight_0_pads() -> None:
    batches = [[1, 2, 3], [4, 5], [6]]
    shares = [ProcessGroup(r, 4, FSDPSettings()).share_batches(batches) for r in range(4)]
    pad = ([1], 0.0)
    assert shares == [[([1], 1.0), pad], [([2, 3], 1.0), pad], [([4], 1.0), pad], [([5], 1.0), ([6], 1.0)]]
    assert ProcessGroup(0, 4, FSDPSettings()).share_for_pass([7, 8]) == ([7], 0.0)
    assert ProcessGroup(1, 4, FSDPSettings()).share_for_pass([7, 8]) == ([7], 1.0)
    assert ProcessGroup(1, 4, FSDPSettings()).share_for_pass([]) == ([], 1.0)


FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "asks for DeepSpeed"),
        ({"ACCELERATE_MIXED_PRECISION": "bf16"}, "run in float32"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "set fsdp_version: 2"),
        ({**FSDP2, "FSDP_OFFLOAD_PARAMS": "true"}, "offload"),
        ({**FSDP2, "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, "each decoder layer"),
    ],
)
def test_launch_modes_the_trainers_do_not_honour_are_refused(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    process_group.cache_clear()
    try:
        with pytest.raises(DistributedError, match=message):
            process_group()
    finally:
        process_group.cache_clear()


def _launch(tmp_path: Path, launch_config: str, *commands: list[object]) -> None:
    """``retroact COMMAND`` for each command in turn, in one launch of two gloo CPU processes (the
    start-up of the launcher and both ranks is most of a launch's time), at low priority."""
    cmd = [
        "nice", "-n", "15", sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "configs" / "accelerate" / launch_config),
        "--main_process_port", str(_free_port()), str(REPO / "tests" / "cli_sequence.py"),
        *(shlex.join(map(str, command)) for command in commands),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]


class Reference(NamedTuple):
    """One-process runs the launched ones must match (shared by the launch modes: they read it only)."""

    model: Path
    data: Path
    il: Path
    il_config: Path
    records: list[TrajectoryRecord]  # a buffer prepared for RL iteration 0
    rl: dict[str, object]
    rl_run: Path
    history: list[dict]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    root = tmp_path_factory.mktemp("one-process")
    model = make_tiny_model(root)
    planner, reflector = get_spec("household").experts()
    data = root / "data"
    collect("household", planner, reflector, data, n_tasks=8, config=LoopConfig(trials=2))
    il_config = root / "il.yaml"
    il_config.write_text(yaml.safe_dump(IL))
    train_il(data, model, root / "il", ILConfig.model_validate(IL), progress=False)
    # One rollout; its buffer, with non-zero rewards so that L_RL counts, feeds both updates
    # (a buffer file without a checkpoint is what a kill during the update leaves: it is reused).
    train_rl(root / "il", data, root / "rollout", RLConfig.model_validate(RL))
    records = [
        r.model_copy(update={"reward": (i % 3) / 2, "next_reward": None if r.role == "planner" else i % 2})
        for i, r in enumerate(read_records(root / "rollout" / "buffer" / "iter_0000.jsonl"))
    ]
    write_records(root / "rl" / "buffer" / "iter_0000.jsonl", records)
    rl = {**RL, "iterations": 2, "eval_tasks": 1}
    history = train_rl(root / "il", data, root / "rl", RLConfig.model_validate(rl))
    return Reference(model, data, root / "il", il_config, records, rl, root / "rl", history)


@pytest.mark.parametrize("launch_config", ["cpu-2proc.yaml", "cpu-2proc-fsdp.yaml"])
def test_two_processes_match_one(tmp_path: Path, launch_config: str, reference: Reference) -> None:
    """DDP-style and FSDP2 launches. RL: iteration 0 trains on a prepared buffer, iteration 1 rolls out
    with the trained adapters (rank 0 alone; under FSDP with gathered weights) and evaluates; the
    two-process run stops after iteration 0 and resumes (optimizer state saved whole, re-sharded).
    One launch runs `il`, then `rl` to 1 and `rl` to 2 iterations."""
    ref = reference
    run_1, run_2 = ref.rl_run, tmp_path / "rl"
    write_records(run_2 / "buffer" / "iter_0000.jsonl", ref.records)
    commands = [
        ["il", "--data", ref.data, "--model", ref.model, "--out", tmp_path / "il", "--config", ref.il_config]
    ]
    for iterations in (1, 2):
        config = tmp_path / f"rl-{iterations}.yaml"
        config.write_text(yaml.safe_dump({**ref.rl, "iterations": iterations}))
        commands.append(["rl", "--init", ref.il, "--data", ref.data, "--out", run_2, "--config", config])
    _launch(tmp_path, launch_config, *commands)

    one, two = _adapters(ref.il), _adapters(tmp_path / "il")
    assert one.keys() == two.keys() and len(one) == 16
    assert all(torch.allclose(one[k], two[k], atol=ATOL) for k in one)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in two.items() if "lora_B" in k)
    # One writer: the same files, and every metrics line once.
    assert _files(ref.il) == _files(tmp_path / "il")
    il_1, il_2 = _lines(ref.il / "metrics.jsonl"), _lines(tmp_path / "il" / "metrics.jsonl")
    assert [(m["event"], m["step"]) for m in il_1] == [(m["event"], m["step"]) for m in il_2]
    for a, b in zip(il_1, il_2, strict=True):
        if a["event"] == "train":
            assert a["target_tokens"] == b["target_tokens"]
            assert (a["loss"], a["grad_norm"]) == pytest.approx((b["loss"], b["grad_norm"]), abs=ATOL)

    one, two = _adapters(run_1 / "latest" / "ckpt"), _adapters(run_2 / "latest" / "ckpt")
    assert all(torch.allclose(one[k], two[k], atol=ATOL) for k in one)
    assert not all(torch.allclose(one[k], v) for k, v in _adapters(ref.il).items())
    assert _files(run_1) == _files(run_2)
    assert read_records(run_2 / "buffer" / "iter_0000.jsonl") == ref.records
    rolled = [read_records(run / "buffer" / "iter_0001.jsonl") for run in (run_1, run_2)]
    assert [[(r.task_id, r.role, r.trial, r.output_ids) for r in rs] for rs in rolled] == [
        [(r.task_id, r.role, r.trial, r.output_ids) for r in rolled[0]]
    ] * 2
    history, got = ref.history, _lines(run_2 / "metrics.jsonl")
    assert len(history) == len(got) == 2
    assert history[1]["eval"] == got[1]["eval"] and history[1]["train"] == got[1]["train"]
    for want, row in zip(history, got, strict=True):
        assert want["samples"] == row["samples"] and want["optimizer_steps"] == row["optimizer_steps"] > 0
        for key in ("loss_rl", "loss_il", "mean_ratio", "clipped_fraction", "entropy"):
            assert row[key] == pytest.approx(want[key], abs=ATOL), key
    assert history[0]["loss_rl"] != 0


def test_fsdp_full_fine_tuning_matches_one_process(tmp_path: Path, reference: Reference) -> None:
    """Full fine-tuning (every weight sharded, the case FSDP is for) of both units, one epoch."""
    model, data = reference.model, reference.data
    cfg = {**{k: v for k, v in IL.items() if k != "lora"}, "epochs": 1, "finetune": "full"}
    (tmp_path / "il.yaml").write_text(yaml.safe_dump(cfg))
    train_il(data, model, tmp_path / "one", ILConfig.model_validate(cfg), progress=False)
    args = ["--data", data, "--model", model, "--out", tmp_path / "two", "--config", tmp_path / "il.yaml"]
    _launch(tmp_path, "cpu-2proc-fsdp.yaml", ["il", *args])
    for unit in ("planner", "reflector"):
        one = load_file(tmp_path / "one" / unit / "model.safetensors")
        two = load_file(tmp_path / "two" / unit / "model.safetensors")
        base = load_file(model / "model.safetensors")
        assert one.keys() == two.keys() and len(one) > 16
        assert all(torch.allclose(one[k], two[k], atol=ATOL) for k in one)
        assert not all(torch.equal(one[k], base[k]) for k in base)
