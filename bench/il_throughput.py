"""Training throughput of ``retroact il`` against TRL's ``SFTTrainer``.

Both train the same model from the same weights on the same tokenised examples of one role (ids
and loss masks from :func:`retroact.data.il_dataset.load_role_data`), with the same batch size,
gradient accumulation, max length, optimizer settings and number of optimizer steps. Throughput
is real (unpadded) prompt + output tokens per second of the training loop; model loading, data
preparation and checkpoint saving are excluded on both sides. TRL runs with each train sampler
asked for (its default ``random`` and ``group_by_length``). With ``--repeats`` the trainers run in
alternating order and the median counts; the last line compares us with the fastest TRL sampler.

    python bench/il_throughput.py --data runs/demo/data --model runs/demo/model --steps 30

Needs TRL (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from rich.console import Console
from rich.table import Table

from retroact.data.il_dataset import ILExample, load_role_data
from retroact.models.hf import load_tokenizer
from retroact.train.common import LoraSettings, load_model, set_num_threads
from retroact.train.il import ILConfig, train_il


def run_ours(args: argparse.Namespace, n_examples: int, out: Path) -> tuple[float, int]:
    steps_per_epoch = math.ceil(n_examples / args.batch_size / args.grad_accum)
    cfg = ILConfig(
        finetune=args.finetune,
        lora=LoraSettings(),
        roles=[args.role],
        lr=args.lr,
        epochs=math.ceil(args.steps / steps_per_epoch) + 1,
        max_steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        loss_scope=args.loss_scope,
        num_threads=args.threads,
        seed=args.seed,
    )
    summary = train_il(args.data, args.model, out, cfg, progress=False)
    assert summary.optimizer_steps == args.steps, summary
    return summary.tokens_per_s, summary.optimizer_steps


def run_trl(
    args: argparse.Namespace, examples: list[ILExample], sampler: str, out: Path
) -> tuple[float, int]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [
        {"input_ids": e.prompt_ids + e.output_ids, "completion_mask": [0] * len(e.prompt_ids) + e.target_mask}
        for e in examples
    ]
    seen = {"tokens": 0}
    clock: dict[str, float] = {}

    class CountingTrainer(SFTTrainer):  # type: ignore[misc]
        def compute_loss(self, model: Any, inputs: dict[str, Any], *a: Any, **kw: Any) -> Any:
            seen["tokens"] += int(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, *a, **kw)

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, *a: Any, **kw: Any) -> None:
            clock["start"] = time.perf_counter()

        def on_train_end(self, *a: Any, **kw: Any) -> None:
            clock["end"] = time.perf_counter()

    peft_config = None
    if args.finetune == "lora":
        from peft import LoraConfig

        lora = LoraSettings()
        peft_config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        )
    config = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps,
        max_length=args.max_length,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        completion_only_loss=True,
        train_sampling_strategy=sampler,
        save_strategy="no",
        report_to="none",
        logging_steps=args.steps,
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16 autocast; both trainers run float32 here
        dataloader_num_workers=0,
        seed=args.seed,
    )
    trainer = CountingTrainer(
        model=load_model(args.model),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=load_tokenizer(args.model),
        peft_config=peft_config,
        callbacks=[Clock()],
    )
    trainer.train()
    return seen["tokens"] / (clock["end"] - clock["start"]), trainer.state.global_step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="IL data dir (output of `retroact collect`)")
    parser.add_argument(
        "--model", type=Path, required=True, help="base model dir (e.g. `retroact init-model`)"
    )
    parser.add_argument("--role", choices=["planner", "reflector"], default="planner")
    parser.add_argument("--finetune", choices=["full", "lora"], default="full")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps for each trainer")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--loss-scope", choices=["model_tokens", "trajectory"], default="model_tokens")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-samplers", default="random,group_by_length", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=1, help="runs per trainer, in alternating order")
    args = parser.parse_args()

    threads = set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    examples = load_role_data(
        args.data,
        args.role,
        load_tokenizer(args.model),
        max_length=args.max_length,
        loss_scope=args.loss_scope,
    ).examples
    console = Console(width=120)
    console.print(
        f"{len(examples)} {args.role} examples, {sum(e.n_tokens for e in examples)} tokens; {args.finetune}, "
        f"{args.steps} steps x {args.batch_size} x {args.grad_accum}, max_length {args.max_length}, "
        f"{threads} threads, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}"
    )
    runs: dict[str, Callable[[Path], tuple[float, int]]] = {
        "retroact il (length-bucketed)": lambda out: run_ours(args, len(examples), out)
    }
    for sampler in args.trl_samplers.split(","):
        runs[f"TRL SFTTrainer ({sampler})"] = lambda out, s=sampler: run_trl(args, examples, s, out)
    tps: dict[str, list[float]] = {name: [] for name in runs}
    steps: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            # Alternate the order so that a drift in machine load does not favour one trainer.
            for i, name in enumerate(list(runs) if r % 2 == 0 else list(reversed(runs))):
                rate, steps[name] = runs[name](Path(tmp) / f"{r}-{i}")
                tps[name].append(rate)

    table = Table("trainer", "optimizer steps", "tokens/s (median)", "runs")
    for name, rates in tps.items():
        table.add_row(
            name, str(steps[name]), f"{statistics.median(rates):,.0f}", ", ".join(f"{x:,.0f}" for x in rates)
        )
    console.print(table)
    ours, *trl = (statistics.median(rates) for rates in tps.values())
    print(f"speedup: {ours / max(trl):.2f}")


if __name__ == "__main__":
    main()
