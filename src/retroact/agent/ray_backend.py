"""The ``ray`` rollout backend: shards on Ray actors that each hold one policy replica.

Each actor loads the base model once (from the checkpoint directory, which every node must be able
to read). Every rollout puts the driver's :class:`~retroact.agent.rollout.PolicyState` in the object
store once; an actor loads it before its first shard of that rollout. Shards go to whichever actor
is free. An actor that dies (killed, out of memory, node lost) is replaced by a fresh one and its
shard goes back to the front of the queue: a shard's result arrives whole or not at all, and a
re-run with the same seed gives the same records, so nothing is lost or duplicated.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retroact.agent.loop import LoopResult, run_trials
from retroact.agent.rollout import (
    RAY_HINT,
    GenerationConfig,
    PolicyState,
    RolloutConfig,
    RolloutError,
    Shard,
    apply_state,
    load_replica,
)
from retroact.envs import EnvSpec
from retroact.models.chat import PromptFormat

try:
    import ray
    from ray.exceptions import GetTimeoutError, OutOfMemoryError, RayActorError, WorkerCrashedError
except ImportError as err:  # the optional extra
    raise ImportError(f"the Ray rollout backend needs Ray: {RAY_HINT}") from err

log = logging.getLogger(__name__)
WORKER_LOST = (RayActorError, WorkerCrashedError, OutOfMemoryError)


class RolloutWorker:
    """A Ray actor: one policy replica that runs shards with the weights of the current rollout."""

    def __init__(
        self, source: str, generation: GenerationConfig, prompt_format: PromptFormat, threads: int
    ) -> None:
        torch.set_num_threads(threads)
        self.policy = load_replica(source, generation, prompt_format)
        self.synced = -1

    def ready(self) -> int:
        return os.getpid()

    def run(self, env: str | EnvSpec, shard: Shard, state: list[Any], sync: int) -> LoopResult:
        """``state`` is ``[ObjectRef]``, nested so that Ray fetches it only when this rollout is new here."""
        if sync != self.synced:
            apply_state(self.policy, ray.get(state[0]))
            self.synced = sync
        return run_trials(env, shard.tasks, self.policy, self.policy, shard.config)


@dataclass
class _Slot:
    actor: Any
    ready: Any
    """ObjectRef of the actor's pid, resolved once the replica has loaded."""
    pid: int | None = None


class RayWorkers:
    """``num_workers`` actors on a local Ray (started here, stopped by ``close``) or on a cluster."""

    def __init__(self, config: RolloutConfig, source: Path, prompt_format: PromptFormat) -> None:
        self.config, self.source, self.prompt_format = config, source, prompt_format
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(address=config.address, include_dashboard=False, logging_level=logging.WARNING)
        for resource, per_worker in (("CPU", config.threads_per_worker), ("GPU", config.gpus_per_worker)):
            need, have = config.num_workers * per_worker, ray.cluster_resources().get(resource, 0)
            if have < need:
                self.close()
                raise RolloutError(
                    f"the Ray cluster has {have:g} {resource}s; rollout.num_workers {config.num_workers} "
                    f"needs {need:g} ({per_worker:g} each)"
                )
        threads = str(config.threads_per_worker)
        self._actor = ray.remote(RolloutWorker).options(  # type: ignore[attr-defined]
            num_cpus=config.threads_per_worker,
            num_gpus=config.gpus_per_worker,
            max_restarts=0,  # a dead actor is replaced by a fresh one here, and its shard re-queued
            max_task_retries=0,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}},
        )
        self.slots = [self._spawn() for _ in range(config.num_workers)]
        self.reruns = 0
        """Shards run again because their worker was lost."""
        self._busy: tuple[_Slot, ...] = ()
        self._sync = 0
        try:
            pids = ray.get([s.ready for s in self.slots], timeout=config.start_timeout)
        except GetTimeoutError:
            free = ray.available_resources()
            self.close()
            raise RolloutError(
                f"Ray workers did not load the policy within {config.start_timeout:g}s "
                f"(free: {free.get('CPU', 0):g} CPUs, {free.get('GPU', 0):g} GPUs)"
            ) from None
        except WORKER_LOST as err:
            self.close()
            raise RolloutError(f"a Ray worker could not load the policy from {source}: {err}") from err
        for slot, pid in zip(self.slots, pids, strict=True):
            slot.pid = pid

    def _spawn(self) -> _Slot:
        cfg = self.config
        actor = self._actor.remote(
            str(self.source), cfg.generation, self.prompt_format, cfg.threads_per_worker
        )
        return _Slot(actor, actor.ready.remote())

    @property
    def busy_pids(self) -> list[int]:
        """Process ids of the workers running a shard now (safe to read from another thread)."""
        return [s.pid for s in self._busy if s.pid is not None]

    def pids(self) -> list[int]:
        """Process ids of all current workers (waits for replacements to load)."""
        for slot in self.slots:
            if slot.pid is None:
                slot.pid = ray.get(slot.ready)
        return [s.pid for s in self.slots if s.pid is not None]

    def run(self, env: str | EnvSpec, shards: Sequence[Shard], state: PolicyState) -> list[LoopResult]:
        """Every shard's result, in shard order; lost workers are replaced and their shards re-run."""
        self._sync += 1
        box = [ray.put(state)]
        results: dict[int, LoopResult] = {}
        pending = deque(shards)
        attempts: Counter[int] = Counter()
        idle = list(self.slots)
        running: dict[Any, tuple[Shard, _Slot]] = {}
        while pending or running:
            while pending and idle:
                shard, slot = pending.popleft(), idle.pop(0)
                running[slot.actor.run.remote(env, shard, box, self._sync)] = (shard, slot)
            self._busy = tuple(slot for _, slot in running.values())
            [ref], _ = ray.wait(list(running), num_returns=1)
            shard, slot = running.pop(ref)
            self._resolve_pid(slot)
            try:
                results[shard.index] = ray.get(ref)
            except WORKER_LOST as err:
                attempts[shard.index] += 1
                if attempts[shard.index] >= self.config.max_attempts:
                    raise RolloutError(
                        f"shard {shard.index} (tasks {_ids(shard)}) lost its worker "
                        f"{attempts[shard.index]} times; last: {err}"
                    ) from err
                log.warning("Ray worker %s lost during shard %d; running it again", slot.pid, shard.index)
                self.reruns += 1
                pending.appendleft(shard)
                slot = self._replace(slot)
            except ray.exceptions.RayTaskError as err:
                raise RolloutError(f"shard {shard.index} (tasks {_ids(shard)}) failed: {err}") from err
            idle.append(slot)
        self._busy = ()
        return [results[s.index] for s in shards]

    def _resolve_pid(self, slot: _Slot) -> None:
        if slot.pid is None and ray.wait([slot.ready], timeout=0)[0]:
            try:
                slot.pid = ray.get(slot.ready)
            except WORKER_LOST:
                pass  # the failed task on this actor reports it

    def _replace(self, slot: _Slot) -> _Slot:
        ray.kill(slot.actor, no_restart=True)
        new = self._spawn()
        self.slots[self.slots.index(slot)] = new
        return new

    def close(self) -> None:
        for slot in getattr(self, "slots", []):
            ray.kill(slot.actor, no_restart=True)
        self.slots = []
        if self._started and ray.is_initialized():
            ray.shutdown()


def _ids(shard: Shard) -> str:
    ids = [t.id for t in shard.tasks]
    return ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
