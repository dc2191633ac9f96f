"""Rollout scale-out: the local loop against 1 and 2 Ray workers, household tasks, the tiny model.

Same tiny model (built offline, fixed seed; 4.3M parameters, so every rollout ships its whole
state dict), same household train tasks, sampling at T = 1 as RL does. Every process (the local
loop and each Ray worker) uses one torch thread. The Ray runs split the tasks into the same shards
(``--shard-size``, default half the tasks), so 1 and 2 workers produce identical records; the
local loop runs all tasks as one batch (the ``local`` backend's default). Startup (Ray, loading
the model in each worker) is timed apart from the rollouts. Prints episodes/s per mode, the load
average it ran under and, last, ``speedup: X`` (2 workers over 1).

    .venv/bin/python bench/rollout_scale.py [--tasks 32] [--trials 2] [--max-steps 10] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from retroact.agent.loop import LoopConfig, LoopResult
from retroact.agent.rollout import RolloutConfig, Rollouts, export_state
from retroact.envs import list_tasks
from retroact.models.corpus import env_corpus
from retroact.models.hf import HFPolicy
from retroact.models.tiny import TinyModelConfig, build_tiny_model

Run = tuple[float, LoopResult]
"""Seconds of one rollout and its result."""


def _timed(rollouts: Rollouts, policy: HFPolicy, args: argparse.Namespace) -> tuple[float, list[Run]]:
    """Startup seconds, then ``--repeats`` rollouts (each ships the weights anew, as in RL)."""
    tasks = list_tasks("household", "train", args.tasks, 0)
    loop = LoopConfig(trials=args.trials, max_steps=args.max_steps, temperature=1.0, batch_size=args.tasks)
    start = time.perf_counter()
    rollouts.start(policy)
    startup = time.perf_counter() - start
    runs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        result = rollouts.run("household", tasks, policy, loop)
        runs.append((time.perf_counter() - t0, result))
    return startup, runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--shard-size", type=int, default=None, help="Ray shard size (default: tasks / 2).")
    parser.add_argument("--repeats", type=int, default=1, help="Rollouts per mode; the median is reported.")
    args = parser.parse_args()
    shard_size = args.shard_size or max(1, args.tasks // 2)

    import ray

    # Ray lowers its workers' priority below the driver's by default; the comparison needs equals.
    os.environ.setdefault("RAY_worker_niceness", "0")
    torch.set_num_threads(1)
    load_start = os.getloadavg()[0]
    rows: list[tuple[str, str, float | None, list[Run]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(
            Path(tmp) / "model", env_corpus(["household"], n_tasks=100), TinyModelConfig()
        )
        policy = HFPolicy.load(model_dir, batch_size=args.tasks)
        state_mb = (
            sum(t.numel() * t.element_size() for t in export_state(policy).weights["planner"].values()) / 1e6
        )

        with Rollouts(RolloutConfig()) as local:
            rows.append(("local loop", "-", None, _timed(local, policy, args)[1]))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            for workers in (1, 2):
                cfg = RolloutConfig(backend="ray", num_workers=workers, shard_size=shard_size)
                with Rollouts(cfg, model_dir) as rollouts:
                    startup, results = _timed(rollouts, policy, args)
                rows.append(("ray", str(workers), startup, results))
        finally:
            ray.shutdown()
    load_end = os.getloadavg()[0]

    print(
        f"household rollouts: {args.tasks} train tasks x {args.trials} trials, max {args.max_steps} steps, "
        f"T=1.0; tiny model, {state_mb:.1f} MB state dict shipped per Ray rollout; Ray shards of "
        f"{shard_size} tasks; 1 torch thread per process"
    )
    print(f"load average (1 min): {load_start:.2f} at start, {load_end:.2f} at end, on {os.cpu_count()} CPUs")
    header = ("mode", "workers", "startup s", "rollout s", "episodes", "episodes/s")
    print(
        f"{header[0]:12s} "
        + " ".join(f"{h:>{w}s}" for h, w in zip(header[1:], (7, 10, 10, 9, 11), strict=True))
    )
    rates = []
    for mode, workers, startup, runs in rows:
        seconds = statistics.median(t for t, _ in runs)
        episodes = sum(r.role == "planner" for r in runs[0][1].records)
        rates.append(episodes / seconds)
        start_s = f"{startup:10.1f}" if startup is not None else f"{'-':>10s}"
        print(f"{mode:12s} {workers:>7s} {start_s} {seconds:10.2f} {episodes:9d} {episodes / seconds:11.2f}")
    one, two = (rows[k][3][0][1].records for k in (1, 2))
    same = [r.model_dump() for r in one] == [r.model_dump() for r in two]
    print(f"identical records with 1 and 2 Ray workers: {same}")
    print(f"speedup: {rates[2] / rates[1]:.2f}")


if __name__ == "__main__":
    main()
