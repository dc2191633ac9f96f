"""Fully sharded training with FSDP2 (``fully_shard``), for ``accelerate launch`` with an FSDP config.

Each rank keeps 1/world_size of every weight, gradient and AdamW moment; a decoder layer's whole
weights exist only while it runs. :class:`~retroact.train.distributed.ProcessGroup` uses what is
here; the trainers see the same calls as under DDP-style training. Three things differ from DDP:

- FSDP reduce-scatters the gradients in the backward pass. The trainers scale every rank's loss to
  the whole batch already, so the shards are summed (divide factor 1), never averaged.
- Every forward and backward pass gathers and scatters with all ranks, so all ranks must run the
  same passes: a rank with a smaller share of a step runs weight-0 passes (``share_batches``).
- Rank 0 alone rolls out and evaluates, which needs whole weights: :func:`gathered` holds them on
  every rank meanwhile. For checkpoints the trained weights and AdamW's moments are gathered
  (:func:`whole`) and written by rank 0; a resumed run re-shards the moments.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class FSDPSettings:
    """The accelerate FSDP config fields RetroAct honours (``fsdp_version: 2``)."""

    reshard_after_forward: bool = True
    """Free a layer's gathered weights after its forward pass (gathered again for backward)."""
    layer_classes: tuple[str, ...] = ()
    """Class names of the modules sharded as units (each decoder layer); empty: the model's
    ``_no_split_modules``."""


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t``, or for a DTensor (an FSDP shard) the whole tensor: a collective every rank must join."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shard(model: torch.nn.Module, settings: FSDPSettings) -> None:
    """``fully_shard`` every decoder layer of ``model`` (a causal LM, PEFT-wrapped or not), then the rest."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(settings.layer_classes or getattr(inner, "_no_split_modules", None) or ())
    layers = [m for m in inner.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"FSDP: no module of class {sorted(names)} in {type(inner).__name__}; name its decoder layer "
            "class in the accelerate config's fsdp_transformer_layer_cls_to_wrap"
        )
    for layer in layers:
        fully_shard(layer, reshard_after_forward=settings.reshard_after_forward)
    # The root's weights (embeddings, final norm, head) stay gathered: backward follows at once.
    fully_shard(model, reshard_after_forward=False)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM


@contextmanager
def gathered(models: Sequence[torch.nn.Module], settings: FSDPSettings) -> Iterator[None]:
    """Whole weights in every sharded module of ``models`` until the block ends, so that one rank
    alone can run forward passes (rollouts, evaluation). Every rank must enter it: gathering is a
    collective. Inside it, read weights from the parameters: FSDP's ``state_dict`` hook re-shards."""
    from torch.distributed.fsdp import FSDPModule

    units = [(m, m is model) for model in models for m in model.modules() if isinstance(m, FSDPModule)]
    for m, _ in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m, is_root in units:
            m.set_reshard_after_forward(settings.reshard_after_forward and not is_root, recurse=False)
            m.reshard()


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with whole moments instead of this rank's shards (a collective)."""
    state = optimizer.state_dict()  # its per-parameter dicts are the live ones: build new ones
    state["state"] = {
        index: {k: whole(v) if torch.is_tensor(v) else v for k, v in moments.items()}
        for index, moments in state["state"].items()
    }
    return state


def sharded_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`full_optimizer_state` for ``optimizer``'s sharded parameters (a collective)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]

    def shard_like(p: torch.Tensor, value: Any) -> Any:
        if isinstance(p, DTensor) and torch.is_tensor(value) and value.shape == p.shape:
            return distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
        return value

    return {
        **state,
        "state": {
            index: {k: shard_like(params[index], v) for k, v in moments.items()}
            for index, moments in state["state"].items()
        },
    }
