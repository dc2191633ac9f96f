"""Rollouts of one policy (planner and reflector) over many tasks, in this process or on Ray workers.

The tasks are cut into *shards* of consecutive tasks; each shard is one batched
:func:`~retroact.agent.loop.run_trials` call with its own seed (shard ``k`` adds ``k * SHARD_SEED_STRIDE``
to the loop seed), and the result is the shards' results in shard order. Records therefore depend
on the shard layout but never on the backend or on which worker ran a shard: the ``local`` backend
runs the shards one after another in this process, the ``ray`` backend spreads them over Ray actors
and re-runs the shard of a worker that died. With one shard (the default for one worker) a rollout
is exactly ``run_trials`` over all tasks.

Workers (and the ``vllm`` generation backend) hold a *replica* of the policy: the base model is
loaded once from ``source``, and every rollout first ships the driver's current trained weights
(:class:`PolicyState`: the LoRA adapters only, or the whole state dict of a ``finetune: full`` model).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from pydantic import BaseModel, ConfigDict, Field

from retroact.agent.loop import LoopConfig, LoopResult, run_trials
from retroact.envs import EnvSpec, Task
from retroact.models.base import ROLES, Policy, Role
from retroact.models.chat import PromptFormat
from retroact.models.hf import HFPolicy
from retroact.models.vllm_policy import VLLMPolicy, VLLMSettings

if TYPE_CHECKING:
    from retroact.agent.ray_backend import RayWorkers

SHARD_SEED_STRIDE = 1_000_003
"""A prime far above any iteration count, so shard seeds never meet the seeds of other iterations."""
RAY_HINT = "pip install 'retroact[ray]'"


class GenerationConfig(BaseModel):
    """Which engine samples during rollouts."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="`hf`: the trained HF model itself (CPU or GPU); `vllm`: a vLLM engine with the "
        "planner and reflector as two LoRA requests, reloaded from the new adapters every rollout (GPU).",
    )
    vllm: VLLMSettings = Field(default_factory=VLLMSettings)


class RolloutConfig(BaseModel):
    """Where rollouts run (YAML: the ``rollout:`` section of the RL config)."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["local", "ray"] = Field(
        "local", description="`local`: shards one after another in this process; `ray`: on Ray actors."
    )
    num_workers: int = Field(
        1, ge=1, description="Ray actors (each holds a policy replica); also the default number of shards."
    )
    shard_size: int | None = Field(
        None,
        ge=1,
        description="Tasks per shard (the unit of work and of sampling seeds); null: an even split "
        "into num_workers shards. Records depend on the shards, never on the backend.",
    )
    address: str | None = Field(
        None, description="Ray cluster address (`auto`, `ray://host:10001`); null: start a local Ray."
    )
    threads_per_worker: int = Field(1, ge=1, description="CPUs reserved and torch threads per Ray actor.")
    gpus_per_worker: float = Field(
        0.0, ge=0, description="GPUs reserved per Ray actor (1 for a vLLM worker)."
    )
    max_attempts: int = Field(
        3, ge=1, description="Runs of one shard (a worker died each time) before the rollout fails."
    )
    start_timeout: float = Field(
        600.0, gt=0, description="Seconds the Ray actors may take to load the model."
    )
    generation: GenerationConfig = Field(default_factory=GenerationConfig)


class RolloutError(RuntimeError):
    """A rollout could not run (Ray missing or unreachable, workers failing, a shard failing)."""


@dataclass(frozen=True)
class Shard:
    index: int
    tasks: list[Task]
    config: LoopConfig


def make_shards(tasks: Sequence[Task], config: RolloutConfig, loop: LoopConfig) -> list[Shard]:
    """Consecutive task slices, each with its own loop seed (shard 0 keeps ``loop.seed``)."""
    size = config.shard_size or max(1, math.ceil(len(tasks) / config.num_workers))
    return [
        Shard(
            k,
            list(tasks[start : start + size]),
            loop.model_copy(update={"seed": loop.seed + k * SHARD_SEED_STRIDE}),
        )
        for k, start in enumerate(range(0, len(tasks), size))
    ]


def merge_results(parts: Sequence[LoopResult]) -> LoopResult:
    """The shards' results as one result, in shard order."""
    if len(parts) == 1:
        return parts[0]
    return LoopResult(
        task_ids=[t for p in parts for t in p.task_ids],
        rewards=[r for p in parts for r in p.rewards],
        successes=[s for p in parts for s in p.successes],
        records=[r for p in parts for r in p.records],
        n_errors=sum(p.n_errors for p in parts),
        n_actions=sum(p.n_actions for p in parts),
        n_valid_actions=sum(p.n_valid_actions for p in parts),
        n_repeat_stops=sum(p.n_repeat_stops for p in parts),
    )


@dataclass
class PolicyState:
    """What a replica needs to act as the driver's policy: its trained weights and its identity.

    ``weights`` maps each role to the state dict of what that role trains: its PEFT adapter
    (``lora``; keys without the adapter name) or its whole model (``full``). Roles that share an
    adapter or model share one dict object, which serialisation stores once.
    """

    name: str
    version: int
    batch_size: int
    prompt_format: PromptFormat
    finetune: Literal["lora", "full"]
    weights: dict[Role, dict[str, torch.Tensor]]
    lora_configs: dict[Role, dict[str, object]]
    """Each role's ``LoraConfig`` as a dict (``lora`` only): what an engine needs to load the adapter."""


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()``, read from the registered parameters and persistent buffers: under FSDP
    rank 0 rolls out with gathered whole weights (``train.fsdp.gathered``), which FSDP's state-dict
    hook would put back into shards."""
    out: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        out.update({dot + name: p.detach() for name, p in module.named_parameters(recurse=False)})
        out.update(
            {
                dot + name: b
                for name, b in module.named_buffers(recurse=False)
                if name not in module._non_persistent_buffers_set
            }
        )
    return out


def export_state(policy: HFPolicy) -> PolicyState:
    """The trained weights of ``policy`` (adapters only when it has adapters)."""
    by_key: dict[object, dict[str, torch.Tensor]] = {}
    weights: dict[Role, dict[str, torch.Tensor]] = {}
    configs: dict[Role, dict[str, object]] = {}
    for role in ROLES:
        model = policy.models[role]
        adapter = policy.adapters.get(role)
        if policy.adapters:
            if adapter is None or not isinstance(model, PeftModel):
                raise ValueError(f"role {role} has no adapter: a LoRA policy must name one for every role")
            key: object = adapter
            if key not in by_key:
                by_key[key] = get_peft_model_state_dict(model, state_dict=_state(model), adapter_name=adapter)
            configs[role] = model.peft_config[adapter].to_dict()
        else:
            key = id(model)
            by_key.setdefault(key, _state(model))
        weights[role] = by_key[key]
    return PolicyState(
        name=policy.info.name,
        version=policy.info.version,
        batch_size=policy.batch_size,
        prompt_format=policy.prompt_format,
        finetune="lora" if policy.adapters else "full",
        weights=weights,
        lora_configs=configs,
    )


def apply_state(replica: Policy, state: PolicyState) -> None:
    """Load ``state`` into a replica (HF: in place; vLLM: as new LoRA requests) and take its identity."""
    if not isinstance(replica, VLLMPolicy | HFPolicy):
        raise TypeError(f"cannot load weights into a {type(replica).__name__}")
    if replica.prompt_format != state.prompt_format:
        raise ValueError(
            f"the replica reads prompts as {replica.prompt_format!r}, the driver as {state.prompt_format!r}"
        )
    if isinstance(replica, VLLMPolicy):
        replica.load_state(state)
    else:
        _load_hf(replica, state)
        replica.batch_size = state.batch_size
    replica.info.name, replica.info.version = state.name, state.version


def _load_hf(replica: HFPolicy, state: PolicyState) -> None:
    for role in ROLES:
        model, weights = replica.models[role], state.weights[role]
        if state.finetune == "full":
            model.load_state_dict(weights, strict=True)
            continue
        adapter = replica.adapters.get(role)
        if adapter is None or not isinstance(model, PeftModel):
            raise ValueError(f"role {role}: the replica has no LoRA adapter to load the shipped weights into")
        result = set_peft_model_state_dict(model, weights, adapter_name=adapter)
        if result.unexpected_keys:
            raise ValueError(
                f"role {role}: shipped adapter weights do not fit the replica's adapter {adapter!r} "
                f"(unexpected keys, e.g. {result.unexpected_keys[0]})"
            )


def load_replica(source: str | Path, generation: GenerationConfig, prompt_format: PromptFormat) -> Policy:
    """A policy replica from a checkpoint or model directory, on the configured generation engine."""
    if generation.backend == "vllm":
        return VLLMPolicy.from_checkpoint(source, generation.vllm, prompt_format=prompt_format)
    return HFPolicy.load(source, prompt_format=prompt_format)


class Rollouts:
    """Runs rollouts with the configured backend; ``close`` (or ``with``) frees Ray workers and engines.

    ``source`` (a RetroAct checkpoint or model directory, readable by every Ray node) is where
    replicas load their base model from; only the ``local`` backend with ``hf`` generation, which
    uses the driver's policy directly, needs none.
    """

    def __init__(self, config: RolloutConfig | None = None, source: str | Path | None = None) -> None:
        self.config = config or RolloutConfig()
        self.source = Path(source) if source is not None else None
        needs_replica = self.config.backend == "ray" or self.config.generation.backend == "vllm"
        if needs_replica and self.source is None:
            raise ValueError(
                f"rollout backend {self.config.backend!r} with {self.config.generation.backend!r} generation "
                "loads policy replicas and needs the checkpoint directory they start from"
            )
        if self.config.backend == "ray" and importlib.util.find_spec("ray") is None:
            raise RolloutError(f"rollout.backend is 'ray' but Ray is not installed; run: {RAY_HINT}")
        self._workers: RayWorkers | None = None
        self._replica: Policy | None = None

    def start(self, policy: HFPolicy) -> None:
        """Start the Ray workers or the local engine replica now (the first ``run`` does otherwise).

        Replicas read prompts in ``policy``'s prompt format."""
        if self.config.backend == "ray" and self._workers is None:
            from retroact.agent.ray_backend import RayWorkers

            assert self.source is not None
            self._workers = RayWorkers(self.config, self.source, policy.prompt_format)
        elif (
            self.config.backend == "local"
            and self.config.generation.backend == "vllm"
            and self._replica is None
        ):
            assert self.source is not None
            self._replica = load_replica(self.source, self.config.generation, policy.prompt_format)

    def run(
        self, env: str | EnvSpec, tasks: Sequence[Task], policy: HFPolicy, loop: LoopConfig
    ) -> LoopResult:
        """``loop.trials`` trials of every task with ``policy`` as planner and reflector.

        ``policy`` holds the current weights; replicas receive them before any shard runs.
        """
        if len({t.id for t in tasks}) != len(tasks):
            raise ValueError("task ids must be unique")
        shards = make_shards(tasks, self.config, loop)
        self.start(policy)
        if self._workers is not None:
            return merge_results(self._workers.run(env, shards, export_state(policy)))
        actor: Policy = policy
        if self._replica is not None:
            apply_state(self._replica, export_state(policy))
            actor = self._replica
        return merge_results([run_trials(env, s.tasks, actor, actor, s.config) for s in shards])

    def close(self) -> None:
        if self._workers is not None:
            self._workers.close()
            self._workers = None
        if isinstance(self._replica, VLLMPolicy):
            self._replica.close()
        self._replica = None

    def __enter__(self) -> Rollouts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
