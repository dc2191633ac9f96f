"""Rollout throughput: the batched lock-step loop against one episode at a time.

Same tiny model (built offline, fixed seed), same household test tasks, same greedy decoding;
prints tokens/s and env steps/s for both and, last, ``speedup: X`` (episodes/s ratio).

    .venv/bin/python bench/rollout.py [--tasks 32] [--trials 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from retroact.agent.loop import LoopConfig, LoopResult, run_trials
from retroact.envs import list_tasks
from retroact.models.corpus import env_corpus
from retroact.models.hf import HFPolicy
from retroact.models.tiny import TinyModelConfig, build_tiny_model


def _measure(name: str, runs: list[LoopResult], seconds: float) -> dict[str, float | str]:
    records = [r for run in runs for r in run.records]
    tokens = sum(sum(r.loss_mask or []) for r in records)
    steps = sum(r.n_steps for r in records if r.role == "planner")
    episodes = sum(r.role == "planner" for r in records)
    return {
        "mode": name,
        "seconds": seconds,
        "episodes/s": episodes / seconds,
        "tokens/s": tokens / seconds,
        "env steps/s": steps / seconds,
        "tokens": tokens,
        "steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=10)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(
            Path(tmp) / "model", env_corpus(["household"], n_tasks=100), TinyModelConfig()
        )
        policy = HFPolicy.load(model_dir, batch_size=args.tasks)
        tasks = list_tasks("household", "test", args.tasks, 0)
        cfg = LoopConfig(trials=args.trials, max_steps=args.max_steps, batch_size=args.tasks)

        start = time.perf_counter()
        batched = run_trials("household", tasks, policy, policy, cfg)
        rows = [_measure("batched lock-step", [batched], time.perf_counter() - start)]

        start = time.perf_counter()
        single = [run_trials("household", [t], policy, policy, cfg) for t in tasks]
        rows.append(_measure("one episode at a time", single, time.perf_counter() - start))

    same = [r.output_ids for r in batched.records] == [r.output_ids for run in single for r in run.records]
    print(
        f"{args.tasks} household tasks, {args.trials} trial(s), max {args.max_steps} steps, greedy; "
        f"identical outputs: {same}"
    )
    print(f"{'mode':24s} {'seconds':>8s} {'episodes/s':>11s} {'tokens/s':>9s} {'env steps/s':>12s}")
    for r in rows:
        print(
            f"{r['mode']:24s} {r['seconds']:8.2f} {r['episodes/s']:11.2f} {r['tokens/s']:9.1f} "
            f"{r['env steps/s']:12.1f}"
        )
    print(f"speedup: {rows[0]['episodes/s'] / rows[1]['episodes/s']:.2f}")


if __name__ == "__main__":
    main()
