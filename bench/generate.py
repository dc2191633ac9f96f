"""Batched sampling throughput of SmolLM2-135M-Instruct on this CPU: one ``HFPolicy.generate`` call
per batch size, on household planner prompts (one test task per row), temperature 1, no stop string.

tokens/s counts sampled tokens over the whole call (prompt prefill included), as a rollout pays it;
tok/cpu-s divides by the process's CPU time instead, which other load on the machine does not
inflate; decode tok/s leaves out the prefill (the time of the same call sampling one token).
Prints the table and, last, ``speedup: X`` (tokens/s at the largest batch over the smallest).

    .venv/bin/python bench/generate.py [--model DIR] [--batch-sizes 1,8,32] [--new-tokens 32]

DIR defaults to the converted model `make smollm2` writes (see retroact.models.pretrained).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from retroact.agent import prompts
from retroact.envs import get_spec, list_tasks
from retroact.models.base import GenRequest, SamplingParams, Segment
from retroact.models.hf import HFPolicy
from retroact.models.pretrained import smollm2_dir


def household_requests(policy: HFPolicy, n: int) -> list[GenRequest]:
    spec = get_spec("household")
    out = []
    for task in list_tasks("household", "test", n, 0):
        text = prompts.planner_prompt(spec.prompts, (), spec.make().reset(task), fewshot=False)
        out.append(GenRequest("planner", [Segment("prompt", text, policy.encode(text, "prompt"))], view=None))  # type: ignore[arg-type]
    return out


def timed(policy: HFPolicy, reqs: list[GenRequest], sampling: SamplingParams) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and sampled tokens of one generate call."""
    start, cpu = time.perf_counter(), time.process_time()
    gens = policy.generate(reqs, sampling)
    return time.perf_counter() - start, time.process_time() - cpu, sum(len(g.token_ids or []) for g in gens)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="Model directory (default: the converted SmolLM2).")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=32, help="Tokens sampled per row.")
    parser.add_argument("--prompt-format", choices=["raw", "chat"], default=None)
    args = parser.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]

    model = args.model or smollm2_dir()
    policy = HFPolicy.load(model, batch_size=max(sizes), prompt_format=args.prompt_format)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, stop=(), seed=0)
    policy.generate(household_requests(policy, 1), SamplingParams(max_new_tokens=4))  # warm-up
    print(f"model {model} ({policy.prompt_format} prompts), {torch.get_num_threads()} torch thread(s)")
    header = ("batch", "prompt tok", "new tok", "seconds", "tokens/s", "tok/cpu-s", "decode tok/s")
    print(" ".join(f"{h:>{max(len(h), 8)}}" for h in header))
    rates = {}
    for size in sizes:
        reqs = household_requests(policy, size)
        prefill = timed(policy, reqs, replace(sampling, max_new_tokens=1))[0]
        seconds, cpu, new = timed(policy, reqs, sampling)
        rates[size] = new / seconds
        prompt = sum(len(r.token_ids) for r in reqs)
        decode = (new - size) / max(seconds - prefill, 1e-9)
        row = (size, prompt, new, f"{seconds:.2f}", f"{rates[size]:.1f}", f"{new / cpu:.1f}", f"{decode:.1f}")
        print(" ".join(f"{v:>{max(len(h), 8)}}" for v, h in zip(row, header, strict=True)))
    print(f"speedup: {rates[sizes[-1]] / rates[sizes[0]]:.2f}")


if __name__ == "__main__":
    main()
