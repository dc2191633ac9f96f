"""Training pieces shared by IL and RL: model preparation, optimisation, checkpoints, metrics.

A run trains one or more *units*: a named LoRA adapter on one frozen base (``lora``) or a whole
model per unit (``full``). Units map to roles in the checkpoint manifest (the shared-model
ablation maps both roles to one unit).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TextIO

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from retroact.models.checkpoint import (
    CheckpointManifest,
    load_manifest,
    replace_dir,
    save_manifest,
)
from retroact.models.hf import load_causal_lm
from retroact.train.fsdp import whole

log = logging.getLogger(__name__)

Finetune = Literal["lora", "full"]
Schedule = Literal["constant", "linear", "cosine"]
TOKENIZER_DIR = "tokenizer"


class LoraSettings(BaseModel):
    """LoRA adapter shape (paper: r 8, alpha 16, dropout 0.05 on q_proj and v_proj)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1, description="Rank of the low-rank update.")
    alpha: int = Field(16, ge=1, description="Scale numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        description="Module names that get adapters.",
    )


def set_num_threads(n: int | None) -> int:
    """Use ``n`` intra-op threads. None: ``$OMP_NUM_THREADS`` if set, else every core this process
    may run on. Returns the count. (More threads than free cores makes small ops many times slower.)"""
    if n is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        n = int(os.environ["OMP_NUM_THREADS"])
    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def load_model(source: str | Path) -> PreTrainedModel:
    """A causal LM (local directory or hub name) to train: float32, on the default device."""
    return load_causal_lm(source, dtype=torch.float32)


class Trainable:
    """The weights a run trains, per unit, and how to export them as a checkpoint."""

    def __init__(self, finetune: Finetune, models: dict[str, torch.nn.Module]) -> None:
        self.finetune = finetune
        self._models = models
        self._active: str | None = None

    @classmethod
    def from_base(
        cls, base: PreTrainedModel, finetune: Finetune, units: Iterable[str], lora: LoraSettings | None = None
    ) -> Trainable:
        """Fresh LoRA adapters on ``base`` (frozen), or one full copy of ``base`` per unit."""
        units = list(units)
        if finetune == "full":
            return cls("full", {u: base if i == 0 else copy.deepcopy(base) for i, u in enumerate(units)})
        from peft import LoraConfig, get_peft_model

        lora = lora or LoraSettings()
        cfg = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(base, cfg, adapter_name=units[0])
        for unit in units[1:]:
            peft_model.add_adapter(unit, cfg)
        return cls("lora", {u: peft_model for u in units})

    @classmethod
    def from_checkpoint(cls, ckpt: str | Path) -> tuple[Trainable, CheckpointManifest]:
        """The units of an exported checkpoint, trainable again (units are its role directories)."""
        ckpt = Path(ckpt)
        manifest = load_manifest(ckpt)
        units = list(dict.fromkeys(manifest.roles.values()))
        if manifest.finetune == "full":
            return cls("full", {u: load_model(ckpt / u) for u in units}), manifest
        from peft import PeftModel

        base_dir = ckpt / manifest.base_model  # a relative base lives beside the checkpoint
        base = load_model(base_dir if base_dir.exists() else manifest.base_model)
        peft_model = PeftModel.from_pretrained(
            base, ckpt / units[0], adapter_name=units[0], is_trainable=True
        )
        for unit in units[1:]:
            peft_model.load_adapter(ckpt / unit, adapter_name=unit, is_trainable=True)
        return cls("lora", {u: peft_model for u in units}), manifest

    @property
    def units(self) -> list[str]:
        return list(self._models)

    @property
    def modules(self) -> list[torch.nn.Module]:
        """The distinct models (one PEFT model holds every LoRA unit)."""
        return list({id(m): m for m in self._models.values()}.values())

    def model(self, unit: str) -> torch.nn.Module:
        """The module to run for ``unit``, in training mode, with only that unit's weights trainable."""
        model = self._models[unit]
        if self.finetune == "lora" and self._active != unit:
            model.set_adapter(unit)
        self._active = unit
        model.train()
        return model

    def _adapter_params(self, unit: str) -> dict[str, torch.nn.Parameter]:
        # PEFT names adapter weights ``...lora_A.<unit>.weight``; select by name because
        # ``set_adapter`` turns requires_grad off on inactive adapters.
        named = self._models[unit].named_parameters()
        return {n: p for n, p in named if "lora_" in n and unit in n.split(".")}

    def parameters(self, unit: str) -> list[torch.nn.Parameter]:
        if self.finetune == "full":
            return list(self._models[unit].parameters())
        return list(self._adapter_params(unit).values())

    def all_parameters(self) -> list[torch.nn.Parameter]:
        return [p for u in self.units for p in self.parameters(u)]

    def weights(self) -> dict[str, torch.Tensor]:
        """The trained weights (keys ``unit/name``), whole, for training state and export: detached
        views of the live weights, not copies (a full model's would double its memory at every
        save), so write them before training on. Under FSDP this gathers the shards: every rank must
        call it, in the same order. Tied weights (one parameter under two names) stay one tensor."""
        out: dict[str, torch.Tensor] = {}
        for unit, model in self._models.items():
            full = self.finetune == "full"
            named = model.state_dict(keep_vars=True) if full else self._adapter_params(unit)
            once: dict[int, torch.Tensor] = {}
            for k, v in named.items():
                if id(v) not in once:
                    once[id(v)] = whole(v.detach())
                out[f"{unit}/{k}"] = once[id(v)]
        return out

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        for unit, model in self._models.items():
            prefix = f"{unit}/"
            mine = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
            if self.finetune == "full":
                model.load_state_dict(mine, strict=True)
                continue
            params = self._adapter_params(unit)
            if set(mine) != set(params):
                raise ValueError(f"saved training state does not match the adapters of unit {unit!r}")
            with torch.no_grad():
                for name, value in mine.items():
                    params[name].copy_(value)

    def export(self, unit: str, out_dir: Path, weights: Mapping[str, torch.Tensor] | None = None) -> None:
        """``save_pretrained`` the unit into ``out_dir`` (replaced whole, never half-written), with
        its entries of ``weights`` (from :meth:`weights`; default: taken now)."""
        staging = out_dir.with_name(out_dir.name + ".staging")
        if staging.exists():
            shutil.rmtree(staging)
        model = self._models[unit]
        prefix = f"{unit}/"
        state = {k[len(prefix) :]: v for k, v in (weights or self.weights()).items() if k.startswith(prefix)}
        if self.finetune == "full":
            model.save_pretrained(staging, state_dict=state)
            replace_dir(staging, out_dir)
            return
        # PEFT writes a non-default adapter into a sub-folder named after it.
        model.save_pretrained(staging, selected_adapters=[unit], state_dict=state)
        replace_dir(staging / unit, out_dir)
        shutil.rmtree(staging)


def write_checkpoint(
    ckpt: Path,
    trainable: Trainable,
    tokenizer: PreTrainedTokenizerBase,
    manifest: CheckpointManifest,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Export the units the manifest names (with ``weights``, see :meth:`Trainable.export`), the
    tokenizer, then the manifest (last: it marks completion)."""
    ckpt.mkdir(parents=True, exist_ok=True)
    weights = weights or trainable.weights()
    for unit in dict.fromkeys(manifest.roles.values()):
        trainable.export(unit, ckpt / unit, weights)
    staging = ckpt / (TOKENIZER_DIR + ".staging")
    if staging.exists():
        shutil.rmtree(staging)
    tokenizer.save_pretrained(staging)
    replace_dir(staging, ckpt / TOKENIZER_DIR)
    save_manifest(ckpt, manifest)


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    # One optimizer for all units: a unit whose weights got no gradient this step (another
    # unit's batch) is skipped by AdamW, and its moments and step count stay untouched.
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: Schedule, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then constant, linear or cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_and_step(
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None,
) -> float | None:
    """Clip the gradient norm and take an optimizer step; None (no step) when the norm is not finite."""
    with_grad = [p for p in params if p.grad is not None]
    norm = whole(torch.nn.utils.clip_grad_norm_(with_grad, grad_clip if grad_clip else float("inf")))
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def save_state(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temp file, fsync, rename: a kill leaves the old or the new state, whole."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path: Path) -> dict[str, Any]:
    # Our own file, holding optimizer and RNG state, which weights_only loading cannot restore.
    return torch.load(path, map_location="cpu", weights_only=False)


METRICS_FILE = "metrics.jsonl"
"""Name of a training run's :class:`MetricsLog` file (IL checkpoints and RL runs alike)."""


class MetricsLog:
    """Append-only ``metrics.jsonl`` (one JSON object per event, each with ``step``), plus TensorBoard.

    ``resume_step`` drops lines logged after the checkpoint being resumed (that work is redone)
    and any torn last line; None starts a new file. ``enabled=False`` (the ranks of a multi-process
    run other than the main one) touches no file and logs nothing.
    """

    def __init__(
        self, path: Path, *, resume_step: int | None, tensorboard: bool = False, enabled: bool = True
    ) -> None:
        self.path = path
        self._file: TextIO | None = None
        self._tb: Any = None
        if not enabled:
            return
        kept: list[str] = []
        if resume_step is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if line.endswith("\n") and entry.get("step", 0) <= resume_step:
                    kept.append(line)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
        self._file = path.open("a", encoding="utf-8")
        self._tb = _tensorboard_writer(path.parent / "tensorboard") if tensorboard else None

    def log(self, event: str, step: int, **fields: Any) -> None:
        if self._file is None:
            return
        entry = {"event": event, "step": step, "time": round(time.time(), 3), **fields}
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        if self._tb is not None:
            prefix = f"{fields['unit']}/" if "unit" in fields else ""
            for key, value in fields.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{event}/{prefix}{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _tensorboard_writer(logdir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed; logging to metrics.jsonl only")
        return None
    return SummaryWriter(str(logdir))
