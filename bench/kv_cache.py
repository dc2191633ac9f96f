"""Carrying each episode's key/value cache from step to step against re-reading the whole context.

Same policy weights, same household test tasks, same batched loop and seeds, temperature 1 (so
trials run their full length); the only difference is ``HFPolicy(prefix_cache_bytes=0)``. Prints
prefill tokens, seconds and episodes/s for both, whether the records are identical, and, last,
``speedup: X`` (episodes/s with the carried cache over without).

    .venv/bin/python bench/kv_cache.py [--model DIR] [--tasks 16] [--trials 1] [--max-steps 20]

DIR defaults to a fresh tiny model (built offline); pass e.g. the converted SmolLM2
(``~/.cache/retroact/smollm2-135m``) to see a real LM.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer

from retroact.agent.loop import LoopConfig, run_trials
from retroact.envs import list_tasks
from retroact.models.corpus import env_corpus
from retroact.models.hf import HFPolicy
from retroact.models.tiny import TinyModelConfig, build_tiny_model


def _count_prefill(fed: list[int], _module: object, _args: object, kwargs: dict[str, Any]) -> None:
    """Input tokens of the forwards that read contexts (decoding forwards pass no logits_to_keep)."""
    if "logits_to_keep" in kwargs:
        fed.append(kwargs["input_ids"].numel())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="Model directory (default: a fresh tiny model).")
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_tiny_model(
            Path(tmp) / "model", env_corpus(["household"], n_tasks=100), TinyModelConfig()
        )
        tasks = list_tasks("household", "test", args.tasks, 0)
        cfg = LoopConfig(trials=args.trials, max_steps=args.max_steps, batch_size=args.tasks, temperature=1.0)
        rows, records = [], []
        for name, budget in (("carried KV cache", 1 << 30), ("re-read every step", 0)):
            policy = HFPolicy(
                AutoModelForCausalLM.from_pretrained(model_dir),
                AutoTokenizer.from_pretrained(model_dir),
                batch_size=args.tasks,
                prefix_cache_bytes=budget,
            )
            prefill: list[int] = []
            policy.models["planner"].register_forward_pre_hook(
                partial(_count_prefill, prefill), with_kwargs=True
            )
            start = time.perf_counter()
            result = run_trials("household", tasks, policy, policy, cfg)
            seconds = time.perf_counter() - start
            episodes = sum(r.role == "planner" for r in result.records)
            rows.append((name, sum(prefill), seconds, episodes / seconds))
            records.append([r.output_ids for r in result.records])

    print(
        f"{model_dir}: {args.tasks} household tasks, {args.trials} trial(s), "
        f"max {args.max_steps} steps, T=1; "
        f"identical records: {records[0] == records[1]}"
    )
    print(f"{'mode':20s} {'prefill tok':>12s} {'seconds':>8s} {'episodes/s':>11s}")
    for name, tokens, seconds, rate in rows:
        print(f"{name:20s} {tokens:12d} {seconds:8.2f} {rate:11.3f}")
    print(f"speedup: {rows[0][3] / rows[1][3]:.2f}")


if __name__ == "__main__":
    main()
