"""Rollout backends: shards, weight shipping, and Ray workers (same records as local, kill a worker)."""

from __future__ import annotations

import importlib.util
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from retroact.agent.loop import LoopConfig, run_trials
from retroact.agent.records import read_records
from retroact.agent.rollout import (
    RolloutConfig,
    RolloutError,
    Rollouts,
    apply_state,
    export_state,
    make_shards,
)
from retroact.envs import list_tasks
from retroact.models.base import GenRequest, SamplingParams, Segment
from retroact.models.checkpoint import CheckpointManifest
from retroact.models.hf import HFPolicy, load_tokenizer
from retroact.train.common import LoraSettings, Trainable, load_model, write_checkpoint
from tests.tiny import make_tiny_model

TASKS = list_tasks("household", "train", 4, 0)
# Sampling at T = 1 (as RL does): identical records then need identical seeds *and* batches.
LOOP = LoopConfig(trials=2, max_steps=2, temperature=1.0, batch_size=8, seed=11)



def _checkpoint(model: Path, out: Path, finetune: str, roles: dict[str, str]) -> Path:
    units = list(dict.fromkeys(roles.values()))
    trainable = Trainable.from_base(load_model(model), finetune, units, LoraSettings(r=4, alpha=8))  # type: ignore[arg-type]
    manifest = CheckpointManifest(base_model=str(model), finetune=finetune, roles=roles)  # type: ignore[arg-type]
    write_checkpoint(out, trainable, load_tokenizer(model), manifest)
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("rollout")
    model = make_tiny_model(tmp)
    both = {"planner": "planner", "reflector": "reflector"}
    return {
        "lora": _checkpoint(model, tmp / "lora", "lora", both),
        "shared": _checkpoint(model, tmp / "shared", "lora", {"planner": "shared", "reflector": "shared"}),
        "full": _checkpoint(model, tmp / "full", "full", both),
    }


def _perturb(policy: HFPolicy, seed: int, version: int) -> HFPolicy:
    """New trained weights, as after an RL update (fresh LoRA B matrices are zero: adapters off)."""
    gen = torch.Generator().manual_seed(seed)
    trained = {p for m in policy.models.values() for n, p in m.named_parameters() if "lora_B" in n}
    trained = trained or {p for m in policy.models.values() for p in m.parameters()}
    with torch.no_grad():
        for p in trained:
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    policy.info.name, policy.info.version = "driver", version
    return policy


@pytest.fixture(scope="module")
def driver(ckpts: dict[str, Path]) -> HFPolicy:
    return _perturb(HFPolicy.load(ckpts["lora"]), seed=1, version=3)


def _dumps(records: list) -> list[dict]:
    return [r.model_dump() for r in records]


def _greedy(policy: HFPolicy, role: str) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probs (an untrained model's argmax barely moves; log-probs do)."""
    text = "You are in the middle of a room.\n> "
    req = GenRequest(role, [Segment("prompt", text, policy.encode(text, "prompt"))], view=None)  # type: ignore[arg-type]
    gen = policy.generate([req], SamplingParams(max_new_tokens=6, stop=()))[0]
    return gen.token_ids or [], gen.logprobs or []


# -- shards and weight shipping (no Ray)


def test_shards_are_consecutive_slices_with_their_own_seeds() -> None:
    shards = make_shards(TASKS, RolloutConfig(num_workers=3), LOOP)
    assert [[t.id for t in s.tasks] for s in shards] == [[t.id for t in TASKS[i : i + 2]] for i in (0, 2)]
    assert shards[0].config == LOOP and shards[1].config.seed != LOOP.seed
    assert [len(s.tasks) for s in make_shards(TASKS, RolloutConfig(shard_size=3), LOOP)] == [3, 1]


def test_one_shard_is_the_plain_loop(driver: HFPolicy) -> None:
    got = Rollouts(RolloutConfig()).run("household", TASKS[:2], driver, LOOP)
    want = run_trials("household", TASKS[:2], driver, driver, LOOP)
    assert _dumps(got.records) == _dumps(want.records)
    assert got.rewards == want.rewards and got.n_actions == want.n_actions


@pytest.mark.parametrize("kind", ["lora", "shared", "full"])
def test_shipped_state_makes_a_replica_act_like_the_driver(ckpts: dict[str, Path], kind: str) -> None:
    source = _perturb(HFPolicy.load(ckpts[kind]), seed=2, version=5)
    replica = HFPolicy.load(ckpts[kind])
    assert _greedy(replica, "planner") != _greedy(source, "planner")
    state = export_state(source)
    if kind == "lora":  # adapters only: no base weight travels
        assert all("lora_" in k for w in state.weights.values() for k in w)
    if kind == "shared":
        assert state.weights["planner"] is state.weights["reflector"]
    apply_state(replica, state)
    assert (replica.info.name, replica.info.version) == ("driver", 5)
    for role in ("planner", "reflector"):
        assert _greedy(replica, role) == _greedy(source, role)


def test_state_that_does_not_fit_is_refused(ckpts: dict[str, Path]) -> None:
    state = export_state(HFPolicy.load(ckpts["lora"]))
    with pytest.raises(ValueError, match="no LoRA adapter"):
        apply_state(HFPolicy.load(ckpts["full"]), state)
    state.prompt_format = "chat"
    with pytest.raises(ValueError, match="prompt"):
        apply_state(HFPolicy.load(ckpts["lora"]), state)


def test_ray_backend_without_ray_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    with pytest.raises(RolloutError, match=r"pip install 'retroact\[ray\]'"):
        Rollouts(RolloutConfig(backend="ray"), tmp_path)


def test_replica_backends_need_a_source() -> None:
    with pytest.raises(ValueError, match="checkpoint directory"):
        Rollouts(RolloutConfig(backend="ray"))


# -- Ray (a local Ray on this machine; 2 workers, one torch thread each)

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed")


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@needs_ray
def test_more_workers_than_the_cluster_has_cpus_is_refused(
    ray_session: None, driver: HFPolicy, ckpts: dict[str, Path]
) -> None:
    with Rollouts(RolloutConfig(backend="ray", num_workers=3), ckpts["lora"]) as rollouts:
        with pytest.raises(RolloutError, match=r"has 2 CPUs; rollout.num_workers 3 needs 3"):
            rollouts.run("household", TASKS, driver, LOOP)


@needs_ray
def test_rl_with_ray_rollouts_fills_the_same_buffer(
    ray_session: None, ckpts: dict[str, Path], tmp_path: Path
) -> None:
    from retroact.train.rl import RLConfig, train_rl

    base = dict(
        iterations=2,
        tasks_per_iteration=2,
        trials=2,
        max_steps=2,
        epochs=1,
        batch_size=2,
        lam=0.0,  # no IL data needed
        eval_tasks=0,
        rewards={"drop_zero_planner": False, "drop_zero_delta": False},
    )
    runs = {}
    for backend in ("local", "ray"):
        # Runs before the tests below hold the 2 CPUs with their own workers (timeout: never hang).
        rollout = {"backend": backend, "start_timeout": 120}
        cfg = RLConfig.model_validate({**base, "rollout": rollout})
        runs[backend] = tmp_path / backend
        history = train_rl(ckpts["lora"], tmp_path / "unused", runs[backend], cfg)
        assert history[-1]["optimizer_steps"] > 0
    for k in range(2):  # iteration 1 samples with the adapters that the update of iteration 0 shipped
        name = f"buffer/iter_{k:04d}.jsonl"
        got, want = read_records(runs["ray"] / name), read_records(runs["local"] / name)
        assert [r.model_dump(exclude={"source"}) for r in got] == [
            r.model_dump(exclude={"source"}) for r in want
        ]


@pytest.fixture(scope="module")
def ray_rollouts(ray_session: None, ckpts: dict[str, Path]) -> Iterator[Rollouts]:
    rollouts = Rollouts(RolloutConfig(backend="ray", num_workers=2, shard_size=1), ckpts["lora"])
    yield rollouts
    rollouts.close()


@pytest.fixture(scope="module")
def local_records(driver: HFPolicy) -> list[dict]:
    """The driver's rollout with the Ray tests' shards, in this process."""
    return _dumps(Rollouts(RolloutConfig(shard_size=1)).run("household", TASKS, driver, LOOP).records)


@needs_ray
def test_ray_workers_give_the_local_records(
    ray_rollouts: Rollouts, driver: HFPolicy, local_records: list[dict]
) -> None:
    result = ray_rollouts.run("household", TASKS, driver, LOOP)
    assert _dumps(result.records) == local_records  # the driver's weights (version 3) reached the workers
    assert {r.adapter_version for r in result.records} == {3}
    assert result.task_ids == [t.id for t in TASKS]


@needs_ray
def test_a_killed_worker_has_its_shard_run_again(
    ray_rollouts: Rollouts, driver: HFPolicy, local_records: list[dict]
) -> None:
    workers = ray_rollouts._workers  # noqa: SLF001 - the pool under test
    assert workers is not None
    before, reruns = set(workers.pids()), workers.reruns
    killed: list[int] = []

    def kill_first_busy() -> None:
        end = time.time() + 30
        while not killed and time.time() < end:
            for pid in workers.busy_pids:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.001)

    killer = threading.Thread(target=kill_first_busy)
    killer.start()
    result = ray_rollouts.run("household", TASKS, driver, LOOP)
    killer.join()
    assert killed and workers.reruns > reruns
    assert _dumps(result.records) == local_records  # nothing lost, nothing twice
    assert len({r.uid for r in result.records}) == len(result.records)
    after = set(workers.pids())
    assert killed[0] in before and killed[0] not in after and len(after) == 2
