"""Training on several processes (``accelerate launch``): ranks, batch shares, summed gradients.

Every process runs the whole trainer: it loads the same data and derives the same step plan from the
seed, then at each optimizer step computes the gradient of its *share* of the global batch, scaled by
the normaliser of the whole batch (which every rank can count from the plan). Summing those
gradients over the ranks gives exactly the single-process gradient, on every rank, so every rank
takes the same optimizer step and the weights stay identical (parameters are broadcast from rank 0
once at the start, as DDP does).

That is DDP's data parallelism, done with explicit all-reduces over the trained parameters rather
than a DDP wrapper, because a step here trains one *unit* (one adapter of a multi-adapter PEFT model,
whose ``requires_grad`` flags follow the active adapter) and a rank may hold no example of a small
step; DDP's fixed set of hooked parameters and its one-backward-per-rank rule allow neither.

With an accelerate FSDP config (``fsdp_version: 2``) the weights, gradients and optimizer state are
sharded instead (:mod:`retroact.train.fsdp`); the trainers make the same calls.

Without ``WORLD_SIZE`` > 1 the trainers use :data:`SINGLE`, whose calls do nothing; accelerate is then
not even imported, so a plain run behaves and performs as before.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

from retroact.models.hf import default_device
from retroact.train import fsdp
from retroact.train.fsdp import FSDPSettings

T = TypeVar("T")

TIMEOUT = timedelta(hours=6)
"""Collective timeout: while rank 0 rolls out and evaluates an RL iteration (which can take hours on
a large model), the other ranks wait in a broadcast; the 30-minute default would kill them."""
_BUCKET = 1 << 26
"""Gradient elements per all-reduce (256 MB of float32): bounds the extra memory of a full model."""
_UNSUPPORTED = {
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
}


class DistributedError(ValueError):
    """The launch asks for something the trainers do not do (DeepSpeed, FSDP1, mixed precision, ...)."""


@dataclass(frozen=True)
class ProcessGroup:
    """This process's rank among ``world_size`` training processes, and the collectives the trainers use."""

    rank: int = 0
    world_size: int = 1
    fsdp: FSDPSettings | None = None
    """Set under an FSDP launch: weights, gradients and optimizer state are sharded."""

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, metrics, buffers and progress output."""
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous slice of ``items``: slices differ in size by one at most, and a
        rank gets nothing when there are fewer items than ranks."""
        n = len(items)
        return list(items[self.rank * n // self.world_size : (self.rank + 1) * n // self.world_size])

    def share_batches(self, batches: Sequence[Sequence[T]]) -> list[tuple[list[T], float]]:
        """This rank's passes for a step given as micro-batches, each with its loss weight.

        The pieces are :meth:`share` of all the items in order, cut again at the micro-batch
        boundaries, so no piece is larger than the micro-batch it comes from (memory) and pieces keep
        the length bucketing; their weight is 1. Under FSDP every rank must run as many passes as
        the rank with the most pieces: the others add passes over the step's first item, weight 0.
        """
        pieces = [(items, 1.0) for items in self._pieces(batches, self.rank)]
        if self.fsdp is not None:
            most = max(len(self._pieces(batches, r)) for r in range(self.world_size))
            pieces += [([batches[0][0]], 0.0)] * (most - len(pieces))
        return pieces

    def _pieces(self, batches: Sequence[Sequence[T]], rank: int) -> list[list[T]]:
        tagged = [(j, x) for j, batch in enumerate(batches) for x in batch]
        mine = ProcessGroup(rank, self.world_size).share(tagged)
        return [[x for _, x in group] for _, group in itertools.groupby(mine, key=lambda t: t[0])]

    def share_for_pass(self, items: Sequence[T]) -> tuple[list[T], float]:
        """:meth:`share` of a batch and its loss weight 1; under FSDP a rank whose share is empty still
        runs the pass every rank runs, over the first item with weight 0 (none if ``items`` is)."""
        part = self.share(items)
        if part or self.fsdp is None or not items:
            return part, 1.0
        return [items[0]], 0.0

    def rank_seed(self, seed: int) -> int:
        """``seed`` on rank 0 (and in one process), another on each other rank: dropout masks of
        different ranks' examples must not repeat each other."""
        return seed + self.rank * 1_000_003

    def sum_gradients(self, params: Sequence[torch.nn.Parameter], extras: Sequence[float]) -> list[float]:
        """Sum the gradients of ``params`` and the numbers ``extras`` (loss parts, flags) over ranks.

        A parameter without a gradient on any rank keeps none, as in one process, so AdamW still
        skips it; one with a gradient somewhere gets the sum (ranks without one add zeros).
        Returns the summed ``extras``; in one process it returns them as given and touches nothing.
        Under FSDP the backward pass has summed the gradients already: only ``extras`` are.
        """
        if self.world_size == 1:
            return list(extras)
        import torch.distributed as dist

        if self.fsdp is not None:
            summed = torch.tensor(list(extras), dtype=torch.float64, device=default_device())
            dist.all_reduce(summed)
            return summed.tolist()
        device = params[0].device if params else default_device()
        head = torch.tensor(
            [*extras, *(float(p.grad is not None) for p in params)], dtype=torch.float64, device=device
        )
        dist.all_reduce(head)
        present = head[len(extras) :].tolist()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for bucket in _buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        for p, g, n in zip(params, grads, present, strict=True):
            p.grad = g if n > 0 else None
        return head[: len(extras)].tolist()

    def broadcast_parameters(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Give every rank rank 0's values of ``params`` (initial adapters must agree exactly)."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def shard(self, models: Sequence[torch.nn.Module]) -> None:
        """Under FSDP, shard ``models`` (after :meth:`broadcast_parameters`, before the optimizer is
        made: sharding replaces the parameters); otherwise nothing."""
        if self.fsdp is not None:
            for model in models:
                fsdp.shard(model, self.fsdp)

    def gathered(self, models: Sequence[torch.nn.Module]) -> contextlib.AbstractContextManager[None]:
        """A block in which ``models`` hold whole weights on every rank (under FSDP: every rank must
        enter it), for rank 0's rollouts and evaluation."""
        if self.fsdp is None:
            return contextlib.nullcontext()
        return fsdp.gathered(models, self.fsdp)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` as one process would have it (under FSDP a collective)."""
        return fsdp.full_optimizer_state(optimizer) if self.fsdp is not None else optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
        """Load a state saved by :meth:`optimizer_state`, under any number of processes."""
        state = dict(state)
        if self.fsdp is not None:
            state = fsdp.sharded_optimizer_state(optimizer, state)
        optimizer.load_state_dict(state)

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` (picklable) on every rank; other ranks' ``obj`` is ignored."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


SINGLE = ProcessGroup()


@functools.cache
def process_group() -> ProcessGroup:
    """The group this process trains in: :data:`SINGLE` unless launched with ``WORLD_SIZE`` > 1.

    Under ``accelerate launch`` (or torchrun) it initialises torch.distributed through accelerate's
    ``PartialState``: gloo on CPUs, NCCL on GPUs, each rank on GPU ``LOCAL_RANK`` (set as the current
    CUDA device, so models loaded on ``cuda`` land there).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SINGLE
    for var, name in _UNSUPPORTED.items():
        if _flag(var):
            raise DistributedError(
                f"the accelerate config asks for {name}; RetroAct's trainers run data-parallel (DDP-style) "
                "or fully sharded (FSDP2): use configs/accelerate/ddp-8gpu.yaml or fsdp-8gpu.yaml"
            )
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision != "no":
        raise DistributedError(
            f"the accelerate config asks for mixed_precision {precision!r}; the trainers run in float32: "
            "set mixed_precision: 'no'"
        )
    settings = _fsdp_settings() if _flag("ACCELERATE_USE_FSDP") else None
    from accelerate import PartialState

    state = PartialState(cpu=default_device().type == "cpu", timeout=TIMEOUT)
    return ProcessGroup(state.process_index, state.num_processes, settings)


def _flag(var: str) -> bool:
    return os.environ.get(var, "").lower() == "true"


def _fsdp_settings() -> FSDPSettings:
    """The accelerate FSDP config (as ``accelerate launch`` exports it), or a clear refusal."""
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise DistributedError(
            f"the accelerate config asks for FSDP version {version}; RetroAct shards with FSDP2 "
            "(fully_shard): set fsdp_version: 2 (see configs/accelerate/fsdp-8gpu.yaml)"
        )
    for var, field in [
        ("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params"),
        ("FSDP_ACTIVATION_CHECKPOINTING", "fsdp_activation_checkpointing"),
    ]:
        if _flag(var):
            raise DistributedError(f"the accelerate config sets {field}: true; RetroAct's FSDP does not")
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    if policy != "TRANSFORMER_BASED_WRAP":
        raise DistributedError(
            f"the accelerate config sets fsdp_auto_wrap_policy {policy}; RetroAct shards each decoder layer: "
            "use TRANSFORMER_BASED_WRAP"
        )
    from accelerate.utils import str_to_bool

    classes = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    return FSDPSettings(
        reshard_after_forward=bool(str_to_bool(os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true"))),
        layer_classes=tuple(c.strip() for c in classes.split(",") if c.strip()),
    )


def _buckets(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive groups of one dtype and at most :data:`_BUCKET` elements (a bigger tensor alone)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        if not out or size + t.numel() > _BUCKET or out[-1][0].dtype != t.dtype:
            out.append([])
            size = 0
        out[-1].append(t)
        size += t.numel()
    return out
