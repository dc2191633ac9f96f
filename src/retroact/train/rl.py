"""Stage 2 (``retroact rl``): iterations of rollout -> replay buffer -> joint policy-gradient update.

Layout of a run directory::

    RUN/buffer/iter_0000.jsonl   rollout records of iteration 0 (policy version 0), written atomically
    RUN/latest/                  checkpoint (manifest version = finished iterations), optimizer and lr state,
                                 state.json; replaced as a whole after each iteration
    RUN/metrics.jsonl            one line per iteration

A kill during a rollout leaves no buffer file for that iteration (it is rolled out again); a
kill during an update leaves the buffer file, which the resumed run reuses as it is. Either way
the buffer holds each iteration's records exactly once.

Under ``accelerate launch`` only the main process rolls out (with its configured backend: Ray
workers spread that work), evaluates and writes ``RUN``; it broadcasts each iteration's records, so
every rank builds the same samples and batches, and the update runs data-parallel: each rank takes
its share of every batch, with the loss terms scaled by the whole batch's normalisers and the
gradients summed (:mod:`retroact.train.distributed`), which is the one-process update.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console

from retroact.agent.loop import LoopConfig
from retroact.agent.records import TrajectoryRecord, read_records, write_records
from retroact.agent.rollout import RolloutConfig, Rollouts
from retroact.data.il_dataset import ILExample, collate_examples, length_batches, load_role_data
from retroact.envs import list_tasks
from retroact.eval.evaluate import evaluate
from retroact.models.base import ROLES, Role
from retroact.models.checkpoint import load_manifest, replace_dir
from retroact.models.hf import HFPolicy, load_tokenizer
from retroact.models.logprobs import collate, token_logprobs
from retroact.train.common import (
    METRICS_FILE,
    MetricsLog,
    Trainable,
    clip_and_step,
    load_state,
    make_optimizer,
    make_scheduler,
    save_state,
    set_num_threads,
    write_checkpoint,
)
from retroact.train.distributed import SINGLE, ProcessGroup, process_group
from retroact.train.jpg import Normalisation, Objective, il_loss, joint_loss, rl_loss
from retroact.train.rewards import RewardConfig, RLSample, build_samples

log = logging.getLogger(__name__)
RESUMABLE = {"num_threads", "tensorboard", "iterations", "rollout"}
"""Settings a resumed run may change; where rollouts run (local or Ray, workers, address) among them."""


class RLConfig(BaseModel):
    """Settings of ``retroact rl`` (YAML keys are these field names; unknown keys are rejected)."""

    model_config = ConfigDict(extra="forbid")

    env: str = Field("household", description="Environment to roll out on (its `train` split).")
    env_options: dict[str, Any] = Field(default_factory=dict, description="Passed to the env's make().")
    iterations: int = Field(4, ge=1, description="Rollout + update rounds.")
    tasks_per_iteration: int = Field(32, ge=1, description="Train tasks rolled out per iteration.")
    trials: int = Field(3, ge=1, description="Trials per task in rollouts (planner and reflector samples).")
    max_steps: int | None = Field(None, ge=1, description="Steps per trial; null: the env's default.")
    temperature: float = Field(1.0, gt=0, description="Rollout sampling temperature (exploration).")
    rollout_batch_size: int = Field(32, ge=1, description="Most episodes per generation call.")
    mode: Literal["off_policy", "on_policy"] = Field(
        "off_policy",
        description="`off_policy`: train on the whole buffer; `on_policy`: latest iteration only.",
    )
    max_staleness: int | None = Field(
        None, ge=0, description="Off-policy: use only samples at most this many versions old; null: all."
    )
    optimise: Literal["both", "planner", "reflector"] = Field(
        "both", description="Roles whose samples train (paper ablation: planner-only / reflector-only)."
    )
    objective: Objective = Field("clipped_is", description="`clipped_is` (paper) or `ppo_clip` (ablation).")
    epsilon: float = Field(0.3, gt=0, lt=1, description="Clip range of the importance weight.")
    lam: float = Field(1.0, ge=0, description="λ: weight of the IL regulariser L_IL.")
    normalisation: Normalisation = Field(
        "sequence",
        description="Token mean: `sequence` averages within each sample, then over samples "
        "(batch-size independent; equals the paper's batch-1 mean); `token` averages over all tokens.",
    )
    rewards: RewardConfig = Field(default_factory=RewardConfig)
    epochs: int = Field(3, ge=1, description="Passes over the (filtered) buffer per iteration (paper: 3).")
    batch_size: int = Field(8, ge=1, description="RL samples per optimizer step.")
    il_batch_size: int = Field(8, ge=1, description="IL examples drawn per optimizer step for L_IL.")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    warmup_steps: int = Field(
        0,
        ge=0,
        description="Linear lr warm-up over the run's first N optimizer steps (0: none). RL starts a fresh "
        "AdamW on IL's weights, whose first steps move every weight by about lr whatever its gradient.",
    )
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="Gradient-norm clip; null: none.")
    max_length: int = Field(4096, ge=2, description="IL examples longer than this are dropped.")
    eval_tasks: int = Field(16, ge=0, description="Fixed eval slice (0: no eval) for IR/FR per iteration.")
    eval_split: str = Field("test", description="Split of the eval slice.")
    eval_trials: int = Field(3, ge=1)
    seed: int = 0
    num_threads: int | None = Field(None, ge=1, description="Torch CPU threads; null: all cores.")
    tensorboard: bool = Field(False, description="Also log to RUN/tensorboard (if installed).")
    rollout: RolloutConfig = Field(
        default_factory=RolloutConfig,
        description="Where rollouts run: `backend: local | ray`, `num_workers`, `shard_size`, `address`, "
        "`generation: {backend: hf | vllm}` (docs/gpu.md).",
    )


class RLError(ValueError):
    pass


def train_rl(
    init_ckpt: str | Path,
    il_data: str | Path,
    out: str | Path,
    config: RLConfig | None = None,
    *,
    console: Console | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) RL from an IL checkpoint; returns the per-iteration metrics.

    Under ``accelerate launch`` every process calls this and gets the same metrics (the main
    process's rollout and eval figures)."""
    cfg = config or RLConfig()
    group = process_group()  # first: under several GPUs it picks this rank's GPU before the model loads
    run = Path(out)
    console = console or Console()
    set_num_threads(cfg.num_threads)
    latest = _latest_dir(run)
    state: dict[str, Any] = json.loads((latest / "state.json").read_text()) if latest else {}
    if state and _stored_config(run, state["config"]) != cfg.model_dump(exclude=RESUMABLE):
        raise RLError(f"{run}: cannot resume with different settings; use the original config or a new --out")
    done = int(state.get("iteration", 0))
    ckpt = latest / "ckpt" if latest else Path(init_ckpt)
    first = load_manifest(ckpt)  # checked before any model is loaded
    if first.finetune == "full" and first.missing_roles:  # LoRA runs a missing role on the base model
        raise RLError(
            f"{ckpt}: no {' or '.join(first.missing_roles)} model; RL of full models needs both roles "
            "(`retroact il` trains both unless its config sets `roles`)"
        )
    trainable, manifest = Trainable.from_checkpoint(ckpt)
    group.broadcast_parameters(trainable.all_parameters())
    group.shard(trainable.modules)
    tokenizer = load_tokenizer(ckpt / "tokenizer")
    units = dict.fromkeys(manifest.roles.values())
    roles_to_train = [r for r in ROLES if cfg.optimise in ("both", r) and r in manifest.roles]
    train_units = list(dict.fromkeys(manifest.roles[r] for r in roles_to_train))
    optimizer = make_optimizer(
        [p for u in train_units for p in trainable.parameters(u)], cfg.lr, cfg.weight_decay
    )
    scheduler = make_scheduler(optimizer, "constant", cfg.warmup_steps, cfg.warmup_steps)
    if latest is not None:
        saved = load_state(latest / "optimizer.pt")
        group.load_optimizer_state(optimizer, saved["optimizer"])
        if "scheduler" in saved:  # runs saved before warm-up existed had none, and a constant lr
            scheduler.load_state_dict(saved["scheduler"])
    il_examples = (
        {r: load_role_data(il_data, r, tokenizer, max_length=cfg.max_length).examples for r in roles_to_train}
        if cfg.lam > 0
        else {}
    )
    policy = HFPolicy(
        {r: trainable.model(u) for r, u in manifest.roles.items()}
        if trainable.finetune == "full"
        else trainable.model(next(iter(units))),
        tokenizer,
        None if trainable.finetune == "full" else dict(manifest.roles),
        name=f"rl:{run}",
        version=done,
        batch_size=cfg.rollout_batch_size,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    buffer_dir = run / "buffer"
    if group.is_main:
        buffer_dir.mkdir(parents=True, exist_ok=True)
        for stale in sorted(buffer_dir.glob("iter_*.jsonl")):  # iterations a kill left unfinished
            if int(stale.stem.split("_")[1]) > done:
                stale.unlink()
    # Replicas start from the checkpoint the driver loaded; the other ranks never roll out.
    rollouts = Rollouts(cfg.rollout, ckpt) if group.is_main else None
    metrics_log = MetricsLog(
        run / METRICS_FILE,
        resume_step=done if latest else None,
        tensorboard=cfg.tensorboard,
        enabled=group.is_main,
    )
    train_tasks = list_tasks(cfg.env, "train", None, cfg.seed)
    history: list[dict[str, Any]] = []
    loaded: dict[int, list[TrajectoryRecord]] = {}  # iteration -> its buffer records, read from disk once
    try:
        for it in range(done, cfg.iterations):
            t0 = time.perf_counter()
            policy.info.version = it
            buffer_file = buffer_dir / f"iter_{it:04d}.jsonl"
            with group.gathered(trainable.modules):  # under FSDP rank 0 generates with whole weights
                if rollouts is None:
                    records = []  # the main process's arrive below
                elif buffer_file.exists():  # rolled out before a kill during the update
                    records = read_records(buffer_file)
                else:
                    tasks = [
                        train_tasks[(it * cfg.tasks_per_iteration + j) % len(train_tasks)]
                        for j in range(cfg.tasks_per_iteration)
                    ]
                    loop_cfg = LoopConfig(
                        trials=cfg.trials,
                        max_steps=cfg.max_steps,
                        temperature=cfg.temperature,
                        batch_size=cfg.rollout_batch_size,
                        seed=cfg.seed * 7919 + it,
                        env_options=cfg.env_options,
                    )
                    records = rollouts.run(cfg.env, _unique(tasks), policy, loop_cfg).records
                    write_records(buffer_file, records)
                records = group.broadcast_object(records)
            loaded[it] = records
            t_rollout = time.perf_counter() - t0
            buffer = _buffer(buffer_dir, it, cfg, loaded)
            samples, dropped = build_samples(buffer, cfg.rewards)
            update = _update(
                trainable,
                manifest.roles,
                roles_to_train,
                samples,
                il_examples,
                optimizer,
                scheduler,
                cfg,
                pad_id,
                seed=cfg.seed * 1_000_003 + it,
                group=group,
            )
            policy.info.version = it + 1
            row: dict[str, Any] = {
                "iteration": it,
                "version": it + 1,
                "train": _rollout_stats(records, cfg.trials),
                "buffer_records": len(buffer),
                "samples": dict(Counter(s.role for s in samples)),
                "dropped": dict(dropped),
                **update,
                "rollout_seconds": round(t_rollout, 2),
            }
            if cfg.eval_tasks:
                with group.gathered(trainable.modules):
                    if group.is_main:
                        row["eval"] = _evaluate(cfg, policy)
            row["seconds"] = round(time.perf_counter() - t0, 2)
            # Logged before the checkpoint swap: a kill in between leaves a line that resume drops.
            metrics_log.log("iteration", it + 1, **row)
            weights, optimizer_state = trainable.weights(), group.optimizer_state(optimizer)  # FSDP gathers
            if group.is_main:
                optimizer_file = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}
                _save_iteration(run, trainable, tokenizer, manifest, weights, optimizer_file, cfg, it + 1)
            row = group.broadcast_object(row)  # also holds the other ranks until RUN/latest is written
            history.append(row)
            if group.is_main:
                console.print(_progress_line(row, cfg.iterations))
    finally:
        if rollouts is not None:
            rollouts.close()
        metrics_log.close()
    return history


def _evaluate(cfg: RLConfig, policy: HFPolicy) -> dict[str, Any]:
    """IR, FR, AR and per-trial figures of ``policy`` as planner and reflector on the fixed eval slice."""
    ev = evaluate(
        cfg.env,
        policy,
        policy,
        split=cfg.eval_split,
        n_tasks=cfg.eval_tasks,
        config=LoopConfig(
            trials=cfg.eval_trials,
            max_steps=cfg.max_steps,
            env_options=cfg.env_options,
            batch_size=cfg.rollout_batch_size,
        ),
        show_progress=False,
    )
    return {k: ev[k] for k in ("IR", "FR", "AR", "per_trial_reward", "per_trial_success")}


def _unique(tasks: Sequence[Any]) -> list[Any]:
    return list({t.id: t for t in tasks}.values())


def _stored_config(run: Path, saved: dict[str, Any]) -> dict[str, Any]:
    """A saved run's settings with the defaults of settings added since (it ran with those)."""
    try:
        return RLConfig.model_validate(saved).model_dump(exclude=RESUMABLE)
    except ValidationError as err:
        raise RLError(f"{run}: its saved settings are not valid RLConfig settings: {err}") from None


def _latest_dir(run: Path) -> Path | None:
    for name in ("latest", "latest.old"):  # .old survives a kill between the two renames
        if (run / name / "state.json").is_file():
            return run / name
    return None


def _save_iteration(
    run: Path,
    trainable: Trainable,
    tokenizer: Any,
    manifest: Any,
    weights: dict[str, torch.Tensor],
    optimizer_file: dict[str, Any],
    cfg: RLConfig,
    finished: int,
) -> None:
    staging = run / "latest.staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    write_checkpoint(
        staging / "ckpt",
        trainable,
        tokenizer,
        manifest.model_copy(update={"version": finished, "stage": "rl"}),
        weights,
    )
    save_state(staging / "optimizer.pt", optimizer_file)  # optimizer and lr-schedule state
    state = {
        "iteration": finished,
        "config": cfg.model_dump(exclude=RESUMABLE),
    }
    (staging / "state.json").write_text(json.dumps(state, indent=2))
    replace_dir(staging, run / "latest")


def _buffer(
    buffer_dir: Path, it: int, cfg: RLConfig, loaded: dict[int, list[TrajectoryRecord]]
) -> list[TrajectoryRecord]:
    """The records the update may use: the latest iteration (on-policy) or all fresh enough ones.

    ``loaded`` caches each iteration's file, so the buffer is not re-read from disk every iteration."""
    first = (
        it
        if cfg.mode == "on_policy"
        else max(0, it - cfg.max_staleness)
        if cfg.max_staleness is not None
        else 0
    )
    for k in range(first, it + 1):
        if k not in loaded:
            loaded[k] = read_records(buffer_dir / f"iter_{k:04d}.jsonl")
    return [r for k in range(first, it + 1) for r in loaded[k]]


def _update(
    trainable: Trainable,
    role_units: dict[Role, str],
    roles: list[Role],
    samples: list[RLSample],
    il_examples: dict[Role, list[ILExample]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: RLConfig,
    pad_id: int,
    *,
    seed: int,
    group: ProcessGroup = SINGLE,
) -> dict[str, Any]:
    """``cfg.epochs`` passes of L = L_RL + λ·L_IL over each trained unit's samples.

    Every rank draws the same batches; under several processes each computes its share of a batch
    (:meth:`ProcessGroup.share`) with each term rescaled from its share's normaliser to the whole
    batch's, so the summed gradients and figures are those of the whole batch."""
    rng = random.Random(seed)
    torch.manual_seed(group.rank_seed(seed))
    sums: Counter[str] = Counter()
    steps = skipped = 0
    for unit in dict.fromkeys(role_units[r] for r in roles):
        unit_roles = [r for r in roles if role_units[r] == unit]
        mine = [s for s in samples if s.role in unit_roles]
        il_pool = [e for r in unit_roles for e in il_examples.get(r, [])]
        if not mine:
            continue
        model = trainable.model(unit)
        params = trainable.parameters(unit)
        for _ in range(cfg.epochs):
            for batch_idx in length_batches(
                mine,
                batch_size=cfg.batch_size,
                max_batch_tokens=None,  # type: ignore[arg-type]
                pool=512,
                rng=rng,
            ):
                batch = [mine[i] for i in batch_idx]
                il_batch = []
                if il_pool and cfg.lam > 0:
                    il_batch = rng.sample(il_pool, min(cfg.il_batch_size, len(il_pool)))
                targets = [sum(s.loss_mask) for s in batch]
                n_tok = float(sum(targets))
                l_rl, ratio, clipped, entropy_sum = _rl_term(model, batch, targets, cfg, pad_id, group)
                l_il = _il_term(model, il_batch, cfg, pad_id, group)
                loss = joint_loss(l_rl, l_il, cfg.lam)
                finite = bool(torch.isfinite(loss))
                if loss.requires_grad:  # even when not finite: under FSDP every rank runs every pass
                    loss.backward()
                steps += 1
                loss_rl, loss_il, ratio, clipped, entropy_sum, non_finite = group.sum_gradients(
                    params,
                    [
                        l_rl.item(),
                        l_il.item() if l_il is not None else 0.0,
                        ratio,
                        clipped,
                        entropy_sum,
                        float(not finite),
                    ],
                )
                if non_finite:
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    log.warning("RL step %d (%s): loss not finite; step skipped", steps, unit)
                    continue
                if clip_and_step(params, optimizer, cfg.grad_clip) is None:
                    skipped += 1
                    continue
                scheduler.step()
                sums["loss_rl"] += loss_rl
                sums["loss_il"] += loss_il
                sums["ratio"] += ratio
                sums["clipped"] += clipped
                sums["entropy"] += entropy_sum / max(n_tok, 1.0)
    done = max(steps - skipped, 1)
    return {
        "optimizer_steps": steps - skipped,
        "skipped_steps": skipped,
        "loss_rl": sums["loss_rl"] / done,
        "loss_il": sums["loss_il"] / done,
        "mean_ratio": sums["ratio"] / done if steps > skipped else math.nan,
        "clipped_fraction": sums["clipped"] / done,
        "entropy": sums["entropy"] / done,
        "lr": scheduler.get_last_lr()[0],
    }


def _rl_term(
    model: torch.nn.Module,
    batch: list[RLSample],
    targets: list[int],
    cfg: RLConfig,
    pad_id: int,
    group: ProcessGroup,
) -> tuple[torch.Tensor, float, float, float]:
    """L_RL of this rank's share of ``batch`` (``targets``: loss tokens per sample), scaled to the
    whole batch, with this share's part of the batch's mean ratio, clipped fraction and entropy sum."""
    part, weight = group.share_for_pass(batch)
    if not part:
        return torch.zeros(()), 0.0, 0.0, 0.0
    tokens = collate([s.prompt_ids for s in part], [s.output_ids for s in part], pad_id)
    mask = _pad([s.loss_mask for s in part], tokens.targets.shape[1])
    behaviour = _pad([s.behaviour_logprobs for s in part], tokens.targets.shape[1])
    logp, entropy = token_logprobs(model, tokens, with_entropy=True, where=mask)
    terms = rl_loss(
        logp,
        behaviour,
        mask,
        torch.tensor([s.reward for s in part]),
        epsilon=cfg.epsilon,
        objective=cfg.objective,
        normalisation=cfg.normalisation,
    )
    n_tok = sum(targets)
    token_share = weight * float(mask.sum()) / n_tok if n_tok else weight
    entropy_sum = weight * (entropy.detach() * mask).sum().item() if entropy is not None else 0.0
    return (
        terms.loss * weight * _share_of(group.share(targets), targets, cfg.normalisation),
        terms.mean_ratio * token_share,
        terms.clipped_fraction * token_share,
        entropy_sum,
    )


def _il_term(
    model: torch.nn.Module, il_batch: list[ILExample], cfg: RLConfig, pad_id: int, group: ProcessGroup
) -> torch.Tensor | None:
    """L_IL of this rank's share of ``il_batch``, scaled to the whole batch; None when it has none."""
    part, weight = group.share_for_pass(il_batch)
    if not part:
        return None
    tokens = collate_examples(part, pad_id)
    logp, _ = token_logprobs(model, tokens.tokens, where=tokens.loss_mask)
    return (
        il_loss(logp, tokens.loss_mask, cfg.normalisation)
        * weight
        * _share_of([e.n_target for e in part], [e.n_target for e in il_batch], cfg.normalisation)
    )


def _share_of(part: Sequence[int], whole: Sequence[int], how: Normalisation) -> float:
    """The factor that turns a loss term over a share of a batch into that share's contribution to
    the term over the whole batch: the ratio of :func:`~retroact.train.jpg.masked_mean`'s
    normalisers (samples for ``sequence``, target tokens for ``token``). ``part`` and ``whole``
    give each sample's target tokens; the factor is exactly 1 for the whole batch."""
    if how == "sequence":
        return len(part) / len(whole)
    return max(sum(part), 1) / max(sum(whole), 1)


def _pad(rows: Sequence[Sequence[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def _rollout_stats(records: list[TrajectoryRecord], trials: int) -> dict[str, Any]:
    """Train reward and success per trial (solved tasks carried), from the rollout's planner records."""
    planner = [r for r in records if r.role == "planner"]
    by_task: dict[str, dict[int, TrajectoryRecord]] = {}
    for r in planner:
        by_task.setdefault(r.task_id, {})[r.trial] = r
    reward = [0.0] * trials
    success = [0.0] * trials
    for per_trial in by_task.values():
        last: TrajectoryRecord | None = None
        for k in range(trials):
            last = per_trial.get(k, last)
            if last is not None:
                reward[k] += last.reward / len(by_task)
                success[k] += float(last.success) / len(by_task)
    steps = sum(r.n_steps for r in planner)
    return {
        "per_trial_reward": reward,
        "per_trial_success": success,
        "episodes": len(planner),
        "errors": sum(r.error is not None for r in records),
        "valid_action_rate": sum(int(r.info.get("valid_actions", r.n_steps)) for r in planner)
        / max(steps, 1),
        "repeated_action_rate": sum(bool(r.info.get("repeat_stop")) for r in planner) / max(len(planner), 1),
    }


def learning_curve(run: str | Path) -> list[dict[str, Any]]:
    """Train reward (mean over trials) per finished iteration of a run, against rollout episodes so far.

    Raises ValueError naming ``RUN/metrics.jsonl`` when it is missing or has no finished iteration."""
    metrics = Path(run) / METRICS_FILE
    if not metrics.is_file():
        raise ValueError(f"{metrics}: no such file (not a `retroact rl` run directory?)")
    episodes, points = 0, []
    for number, line in enumerate(metrics.read_text().splitlines(keepends=True), 1):
        if not line.endswith("\n"):  # a run being written or killed mid-line; MetricsLog drops it too
            break
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{metrics}:{number}: not JSON ({err.msg})") from None
        if row.get("event") != "iteration":
            continue
        train = row["train"]
        episodes += train["episodes"]
        points.append(
            {
                "iteration": row["iteration"] + 1,
                "episodes": episodes,
                "train_reward": sum(train["per_trial_reward"]) / len(train["per_trial_reward"]),
                "eval_FR": row.get("eval", {}).get("FR"),
            }
        )
    if not points:
        raise ValueError(f"{metrics}: no finished iteration yet")
    return points


def mean_curve(curves: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Several runs' learning curves (e.g. seeds) averaged per iteration, up to the shortest run."""
    points = []
    for i in range(min(len(c) for c in curves)):
        at = [c[i] for c in curves]
        fr = [p["eval_FR"] for p in at]
        points.append(
            {
                "iteration": i + 1,
                "episodes": round(sum(p["episodes"] for p in at) / len(at)),
                "train_reward": sum(p["train_reward"] for p in at) / len(at),
                "eval_FR": None if None in fr else sum(fr) / len(fr),
            }
        )
    return points


def smooth_curve(points: list[dict[str, Any]], window: int) -> list[dict[str, Any]]:
    """A learning curve with each value replaced by its trailing mean over the last ``window`` iterations.

    Trailing (only past iterations) so a point never uses rewards the run had not yet collected; the
    first points average what there is. ``window`` 1 returns the curve unchanged."""
    if window < 1:
        raise ValueError(f"smoothing window must be at least 1, got {window}")

    def trailing(i: int, key: str) -> float | None:
        values = [p[key] for p in points[max(0, i + 1 - window) : i + 1]]
        return None if None in values else sum(values) / len(values)

    return [
        {**p, "train_reward": trailing(i, "train_reward"), "eval_FR": trailing(i, "eval_FR")}
        for i, p in enumerate(points)
    ]


def _progress_line(row: dict[str, Any], total: int) -> str:
    train = row["train"]
    ev = row.get("eval", {})
    evs = f" eval IR {ev['IR']:.3f} FR {ev['FR']:.3f}" if ev else ""
    update = (
        f"L_RL {row['loss_rl']:.4f} L_IL {row['loss_il']:.4f} ratio {row['mean_ratio']:.3f} "
        f"clip {row['clipped_fraction']:.3f} H {row['entropy']:.3f}"
        if sum(row["samples"].values())
        else "no RL samples (nothing to update)"
    )
    return (
        f"[bold]iter {row['iteration'] + 1}/{total}[/bold] train R/trial "
        f"{' '.join(f'{x:.2f}' for x in train['per_trial_reward'])}{evs} | {update} "
        f"valid {train['valid_action_rate']:.2f} "
        f"repeat {train['repeated_action_rate']:.2f} buffer {row['buffer_records']} | {row['seconds']:.0f}s"
    )
