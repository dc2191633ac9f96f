"""Stage 1: imitation learning of the planner and the reflector on filtered expert records (SPEC §2).

Each unit (the ``planner`` and ``reflector`` LoRA adapters on one frozen base, one ``shared``
adapter, or full models) is trained on its roles' examples with the token NLL of the output given
the prompt. Steps of the units are interleaved at random within an epoch; each step uses one
unit's batches only. The loss of an optimizer step is the mean NLL over the target tokens of all
its micro-batches, so gradient accumulation gives the same update as one large batch.

Resumable: ``CKPT/train_state.pt`` (trained weights, optimizer, scheduler, RNG, counters) is
replaced atomically at every save and the epoch plan is a pure function of the seed, so a run
killed at any point and restarted on the same ``CKPT`` ends with the same weights.

Under ``accelerate launch`` every process follows the same plan and trains on its share of each
step's examples (:meth:`ProcessGroup.share_batches`), with the loss divided by the step's target
tokens on all ranks and the gradients summed (:mod:`retroact.train.distributed`): the update is the
one-process update of the same step. Only the main process writes ``CKPT``.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from retroact.data.il_dataset import (
    ILBatch,
    ILExample,
    LossScope,
    RoleData,
    collate_examples,
    fingerprint,
    length_batches,
    load_role_data,
)
from retroact.models.base import Role
from retroact.models.checkpoint import CheckpointManifest, is_checkpoint
from retroact.models.hf import load_tokenizer
from retroact.models.logprobs import token_logprobs
from retroact.train.common import (
    METRICS_FILE,
    LoraSettings,
    MetricsLog,
    Schedule,
    Trainable,
    clip_and_step,
    load_model,
    load_state,
    make_optimizer,
    make_scheduler,
    save_state,
    set_num_threads,
    write_checkpoint,
)
from retroact.train.distributed import SINGLE, ProcessGroup, process_group

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
# Settings that do not change what is computed; a resumed run may change them.
RESUME_NEUTRAL = frozenset({"save_every_steps", "num_threads", "tensorboard"})


class ILError(ValueError):
    """An IL run cannot start or resume; the message says why and where."""


class ILConfig(BaseModel):
    """Settings of ``retroact il`` (YAML keys are these field names; unknown keys are rejected)."""

    model_config = ConfigDict(extra="forbid")

    finetune: Literal["lora", "full"] = Field(
        "lora",
        description="`lora`: adapters on a frozen base (paper). `full`: train whole models, one per unit "
        "(for tiny models trained from scratch).",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="Adapter shape (lora mode only).")
    roles: list[Role] = Field(
        default_factory=lambda: ["planner", "reflector"],
        min_length=1,
        description="Roles to train; each needs DATA/<role>.jsonl. ['planner'] is the SFT baseline.",
    )
    shared: bool = Field(False, description="Train one unit ('shared') on all roles' data (ablation).")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    schedule: Schedule = Field(
        "constant", description="Learning-rate shape after warm-up: constant, linear, cosine."
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of optimizer steps of linear warm-up.")
    epochs: int = Field(5, ge=1, description="Passes over the data (paper: 5).")
    max_steps: int | None = Field(
        None,
        ge=1,
        description="Stop after this many optimizer steps (benchmarks, smoke runs); null: all epochs.",
    )
    batch_size: int = Field(8, ge=1, description="Most examples per micro-batch (paper: 1).")
    max_batch_tokens: int | None = Field(
        None, ge=1, description="Also cap a micro-batch at this many padded tokens (prompt + output columns)."
    )
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_length: int = Field(2048, ge=2, description="Examples with more prompt + output tokens are dropped.")
    loss_scope: LossScope = Field(
        "model_tokens",
        description="`model_tokens`: NLL on model-written tokens only. `trajectory`: on the whole output, "
        "observations included (the reference code). Prompt tokens and an expert's deliberate mistakes "
        "(`collect --mistakes`) never count.",
    )
    grad_clip: float | None = Field(
        1.0, gt=0, description="Clip the gradient norm to this; null: no clipping."
    )
    seed: int = Field(0, description="Seeds adapter init, batch order and dropout.")
    length_pool: int = Field(
        512,
        ge=1,
        description="Examples batched together by length (larger: less padding, less randomness).",
    )
    save_every_steps: int = Field(
        0, ge=0, description="Also checkpoint every N optimizer steps (0: only at the end of each epoch)."
    )
    num_threads: int | None = Field(None, ge=1, description="Torch CPU threads; null: all cores available.")
    tensorboard: bool = Field(
        False, description="Also log to CKPT/tensorboard (if tensorboard is installed)."
    )

    @model_validator(mode="after")
    def _check(self) -> ILConfig:
        if len(set(self.roles)) != len(self.roles):
            raise ValueError(f"roles has duplicates: {self.roles}")
        if self.max_batch_tokens is not None and self.max_batch_tokens < self.max_length:
            raise ValueError(f"max_batch_tokens ({self.max_batch_tokens}) < max_length ({self.max_length})")
        return self

    def units(self) -> dict[str, list[Role]]:
        """Unit name -> roles whose data it trains on."""
        return {"shared": list(self.roles)} if self.shared else {r: [r] for r in self.roles}


@dataclass
class ILSummary:
    out: str
    finetune: str
    units: dict[str, dict[str, Any]]
    """Unit -> roles, examples, tokens, target tokens, mean loss of the last epoch."""
    data: dict[str, dict[str, object]]
    """Role -> records read, examples kept, dropped by reason."""
    epochs: int
    total_steps: int
    optimizer_steps: int
    skipped_steps: int
    """Steps skipped because the loss or gradient was not finite."""
    resumed_from_step: int | None
    seconds: float
    """Wall time of this call's training loop, checkpoint saving excluded."""
    tokens_per_s: float
    """Real (unpadded) prompt + output tokens per second in this call."""


@dataclass
class _Counters:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    optimizer_steps: int = 0
    skipped_steps: int = 0
    epoch_nll: dict[str, list[float]] = field(default_factory=dict)
    """Unit -> [NLL sum, target tokens] so far this epoch."""
    last_epoch_loss: dict[str, float] = field(default_factory=dict)
    done: bool = False


Step = tuple[str, list[list[int]]]
"""A unit and the example-index micro-batches of one optimizer step."""


def epoch_plan(examples: dict[str, list[ILExample]], config: ILConfig, epoch: int) -> list[Step]:
    """The optimizer steps of one epoch, a pure function of the data, the config and the epoch."""
    rng = random.Random(config.seed * 1_000_003 + epoch)
    steps: list[Step] = []
    for unit, exs in examples.items():
        batches = length_batches(
            exs,
            batch_size=config.batch_size,
            max_batch_tokens=config.max_batch_tokens,
            pool=config.length_pool,
            rng=rng,
        )
        steps += [
            (unit, batches[i : i + config.grad_accum]) for i in range(0, len(batches), config.grad_accum)
        ]
    rng.shuffle(steps)
    return steps


def _cut(plan: list[list[Step]], max_steps: int) -> list[list[Step]]:
    """The plan's first ``max_steps`` steps (epochs left empty are dropped)."""
    out: list[list[Step]] = []
    for steps in plan:
        if max_steps <= 0:
            break
        out.append(steps[:max_steps])
        max_steps -= len(out[-1])
    return out


def train_il(
    data_dir: str | Path,
    model_path: str | Path,
    out_ckpt: str | Path,
    config: ILConfig | None = None,
    *,
    progress: bool = True,
) -> ILSummary:
    """Train the IL units on ``data_dir``'s records and write the checkpoint ``out_ckpt``.

    If ``out_ckpt`` holds the training state of an unfinished run with the same settings, model and
    data, training resumes from its last save; a finished run is re-exported and returned as is.
    Under ``accelerate launch`` every process calls this, and each returns once ``out_ckpt`` is written.
    """
    cfg = config or ILConfig()
    group = process_group()  # first: under several GPUs it picks this rank's GPU before the model loads
    out = Path(out_ckpt)
    state_file = out / STATE_FILE
    resuming = state_file.is_file()
    if not resuming and is_checkpoint(out):
        raise ILError(f"{out} holds a checkpoint but no IL training state ({STATE_FILE}); choose a new --out")
    set_num_threads(cfg.num_threads)

    base = load_model(model_path)
    tokenizer = load_tokenizer(model_path)
    data: dict[Role, RoleData] = {
        role: load_role_data(data_dir, role, tokenizer, max_length=cfg.max_length, loss_scope=cfg.loss_scope)
        for role in cfg.roles
    }
    units = cfg.units()
    examples = {u: [e for r in roles for e in data[r].examples] for u, roles in units.items()}
    plan = _cut([epoch_plan(examples, cfg, e) for e in range(cfg.epochs)], cfg.max_steps or sys.maxsize)
    total_steps = sum(len(p) for p in plan)

    manifest = CheckpointManifest(
        base_model=str(Path(model_path).resolve()),
        finetune=cfg.finetune,
        roles={r: u for u, roles in units.items() for r in roles},
        version=0,
        stage="il",
    )
    identity = {
        "config": cfg.model_dump(exclude=set(RESUME_NEUTRAL)),
        "base_model": manifest.base_model,
        "data": {u: fingerprint(exs) for u, exs in examples.items()},
    }
    state = load_state(state_file) if resuming else None
    if state is not None:
        _check_same_run(state_file, state["identity"], identity)

    torch.manual_seed(cfg.seed)
    trainable = Trainable.from_base(base, cfg.finetune, units, cfg.lora)
    group.broadcast_parameters(trainable.all_parameters())
    if state is not None:
        trainable.load_weights(state["weights"])
    group.shard(trainable.modules)
    optimizer = make_optimizer(trainable.all_parameters(), cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.schedule, round(cfg.warmup_ratio * total_steps), total_steps)
    c = _Counters()
    if state is not None:
        group.load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        c = _Counters(**state["counters"])
        log.info("%s: resuming at step %d of %d", out, c.global_step, total_steps)
    resumed_from = c.global_step if resuming else None

    save_seconds = 0.0

    def save() -> None:
        nonlocal save_seconds
        t0 = time.perf_counter()
        weights, optimizer_state = trainable.weights(), group.optimizer_state(optimizer)  # FSDP: all gather
        if group.is_main:
            save_state(
                state_file,
                {
                    "identity": identity,
                    "weights": weights,
                    "optimizer": optimizer_state,
                    "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "counters": asdict(c),
                },
            )
            write_checkpoint(out, trainable, tokenizer, manifest, weights)
        save_seconds += time.perf_counter() - t0

    if group.is_main:
        out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(
        out / METRICS_FILE, resume_step=resumed_from, tensorboard=cfg.tensorboard, enabled=group.is_main
    )
    pad_id = _pad_id(tokenizer)
    finished_before = c.done
    if finished_before:  # a kill may have cut the last export short
        weights = trainable.weights()
        if group.is_main:
            write_checkpoint(out, trainable, tokenizer, manifest, weights)
    tokens_seen = 0
    started = time.perf_counter()
    try:
        if resumed_from is None:
            metrics.log("start", 0, total_steps=total_steps, data={r: d.summary() for r, d in data.items()})
        with _progress_bar(progress and group.is_main) as bar:
            task = bar.add_task("IL", total=total_steps, completed=c.global_step, loss=math.nan, tps=0.0)
            for epoch in range(c.epoch, len(plan)):
                steps = plan[epoch]
                for k in range(c.step_in_epoch, len(steps)):
                    unit, batches = steps[k]
                    step_examples = [examples[unit][i] for b in batches for i in b]
                    n_target = sum(e.n_target for e in step_examples)
                    micro = [
                        (collate_examples([examples[unit][i] for i in b], pad_id), weight)
                        for b, weight in group.share_batches(batches)
                    ]
                    if group.world_size > 1:  # per-step seeds: resumable without every rank's RNG state
                        torch.manual_seed(group.rank_seed(cfg.seed * 1_000_003 + c.global_step))
                    nll, grad_norm = _train_step(
                        trainable, unit, micro, optimizer, cfg.grad_clip, n_target=n_target, group=group
                    )
                    scheduler.step()
                    tokens_seen += sum(e.n_tokens for e in step_examples)
                    c.global_step += 1
                    c.step_in_epoch = k + 1
                    tps = tokens_seen / max(time.perf_counter() - started - save_seconds, 1e-9)
                    if grad_norm is None:
                        c.skipped_steps += 1
                        log.warning(
                            "step %d (%s): loss or gradient not finite; step skipped", c.global_step, unit
                        )
                        metrics.log("skip", c.global_step, epoch=epoch, unit=unit)
                    else:
                        c.optimizer_steps += 1
                        acc = c.epoch_nll.setdefault(unit, [0.0, 0])
                        acc[0] += nll
                        acc[1] += n_target
                        metrics.log(
                            "train",
                            c.global_step,
                            epoch=epoch,
                            unit=unit,
                            loss=nll / n_target,
                            lr=scheduler.get_last_lr()[0],
                            grad_norm=grad_norm,
                            target_tokens=n_target,
                            tokens_per_s=tps,
                        )
                        bar.update(task, loss=nll / n_target)
                    bar.update(task, advance=1, tps=tps)
                    if (
                        cfg.save_every_steps
                        and c.global_step % cfg.save_every_steps == 0
                        and k + 1 < len(steps)
                    ):
                        save()
                c.last_epoch_loss = {u: s / max(n, 1) for u, (s, n) in c.epoch_nll.items()}
                c.epoch, c.step_in_epoch, c.epoch_nll = epoch + 1, 0, {}
                c.done = c.epoch == len(plan)
                metrics.log("epoch", c.global_step, epoch=epoch, loss=c.last_epoch_loss)
                save()
        train_time = time.perf_counter() - started - save_seconds
        summary = ILSummary(
            out=str(out),
            finetune=cfg.finetune,
            units={
                u: {
                    "roles": roles,
                    "examples": len(examples[u]),
                    "tokens": sum(e.n_tokens for e in examples[u]),
                    "target_tokens": sum(e.n_target for e in examples[u]),
                    "last_epoch_loss": c.last_epoch_loss.get(u),
                }
                for u, roles in units.items()
            },
            data={r: d.summary() for r, d in data.items()},
            epochs=len(plan),
            total_steps=total_steps,
            optimizer_steps=c.optimizer_steps,
            skipped_steps=c.skipped_steps,
            resumed_from_step=resumed_from,
            seconds=round(train_time, 3),
            tokens_per_s=round(tokens_seen / train_time, 1) if train_time > 0 else 0.0,
        )
        if not finished_before:
            metrics.log("done", c.global_step, summary=asdict(summary))
    finally:
        metrics.close()
    group.barrier()  # no rank returns (and, say, starts RL from CKPT) before the main one has written it
    return summary


def _train_step(
    trainable: Trainable,
    unit: str,
    micro: Sequence[tuple[ILBatch, float]],
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None,
    *,
    n_target: int | None = None,
    group: ProcessGroup = SINGLE,
) -> tuple[float, float | None]:
    """One optimizer step on ``unit``: (NLL sum over target tokens, grad norm or None if skipped).

    ``micro`` holds (micro-batch, loss weight) pairs. Under several processes it is this rank's
    share of the step (:meth:`ProcessGroup.share_batches`), ``n_target`` the step's target tokens
    on all ranks (default: those of ``micro``), and the result the step's.
    """
    model = trainable.model(unit)
    n_target = n_target or sum(b.n_target for b, weight in micro if weight > 0)
    total = 0.0
    for b, weight in micro:
        logp, _ = token_logprobs(model, b.tokens, where=b.loss_mask)
        nll = -(logp * b.loss_mask).sum() * weight
        # Backward even when not finite: under FSDP every rank must run every pass; the step is skipped below.
        (nll / n_target).backward()
        total += nll.item()
    params = trainable.parameters(unit)
    total, non_finite = group.sum_gradients(params, [total, float(not math.isfinite(total))])
    if non_finite:
        optimizer.zero_grad(set_to_none=True)
        return math.nan, None
    return total, clip_and_step(params, optimizer, grad_clip)


def _check_same_run(state_file: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    problems = [
        f"{key}: {saved['config'].get(key)!r} -> {value!r}"
        for key, value in current["config"].items()
        if saved["config"].get(key) != value
    ]
    if saved["base_model"] != current["base_model"]:
        problems.append(f"model: {saved['base_model']} -> {current['base_model']}")
    if saved["data"] != current["data"]:
        problems.append("the training data differs")
    if problems:
        raise ILError(
            f"{state_file}: cannot resume a run with different settings ({'; '.join(problems)}); "
            "use the original settings or a new --out"
        )


def _pad_id(tokenizer: Any) -> int:
    # Padding is masked out by the attention mask, so any valid id works.
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )
