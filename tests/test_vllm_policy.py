"""The vLLM backend's engine-agnostic part (VLLMPolicy), run on an HF engine and checked against HFPolicy.

vLLM itself needs a GPU; :class:`HFEngine` below serves the same :class:`Engine` protocol with the
HF sampler, loading each ``LoRAHandle`` from its directory as vLLM would, so everything but the
``vllm.LLM`` calls (adapter versions, sanity generations, per-request seeds, errors, the loop and
the rollout wiring) runs here.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from retroact.agent.loop import LoopConfig, run_trials
from retroact.agent.rollout import RolloutConfig, Rollouts, export_state
from retroact.envs import list_tasks
from retroact.models.base import Generation, GenRequest, SamplingParams, Segment
from retroact.models.checkpoint import CheckpointManifest, load_manifest, save_manifest
from retroact.models.hf import HFPolicy, load_causal_lm, load_tokenizer
from retroact.models.vllm_policy import (
    AdapterError,
    EngineRequest,
    VLLMEngine,
    VLLMPolicy,
    VLLMSettings,
)
from retroact.train.common import LoraSettings, Trainable, load_model, write_checkpoint
from tests.tiny import make_tiny_model

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8, stop=())
PROMPTS = ["You are in the middle of a room.\n> ", "Your task is to: put a pen in drawer.\n> go to"]


class HFEngine:
    """The Engine protocol on an HF model: every LoRA handle is loaded from its path under its name."""

    def __init__(self, base: str, tokenizer: str, settings: VLLMSettings | None = None) -> None:
        self.model: torch.nn.Module = load_causal_lm(base)
        self.tokenizer = load_tokenizer(tokenizer)
        self.max_positions: int | None = self.model.config.max_position_embeddings
        self.calls: list[list[EngineRequest]] = []

    def _adapter(self, request: EngineRequest) -> dict[str, str]:
        handle = request.adapter
        if handle is None:
            return {}
        if not isinstance(self.model, PeftModel):
            self.model = PeftModel.from_pretrained(self.model, handle.path, adapter_name=handle.name)
        elif handle.name not in self.model.peft_config:
            self.model.load_adapter(handle.path, adapter_name=handle.name)
        return {"planner": handle.name}

    def generate(self, requests: Sequence[EngineRequest]) -> list[Generation]:
        self.calls.append(list(requests))
        out = []
        for r in requests:  # one at a time with the request's own seed, as vLLM samples
            adapters = self._adapter(r)  # may wrap self.model in a PeftModel
            policy = HFPolicy(self.model, self.tokenizer, adapters)  # type: ignore[arg-type]
            req = GenRequest("planner", [Segment("prompt", "", r.prompt_ids)], view=None)  # type: ignore[arg-type]
            out.append(policy.generate([req], r.sampling)[0])
        return out

    def close(self) -> None:
        self.calls.clear()



def _perturb(policy: HFPolicy, seed: int, version: int) -> HFPolicy:
    """Distinct trained adapters per role (fresh LoRA B matrices are zero: adapters off)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in dict.fromkeys(policy.models.values()):
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    policy.info.name, policy.info.version = "driver", version
    return policy


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("vllm"))


def _checkpoint(model: Path, out: Path, finetune: str = "lora") -> Path:
    """A checkpoint (version 2) whose LoRA adapters differ per role and from the base."""
    roles = {"planner": "planner", "reflector": "reflector"}
    trainable = Trainable.from_base(load_model(model), finetune, list(roles), LoraSettings(r=4, alpha=8))  # type: ignore[arg-type]
    if finetune == "lora":
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in trainable.all_parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    manifest = CheckpointManifest(base_model=str(model), finetune=finetune, roles=roles, version=2)  # type: ignore[arg-type]
    write_checkpoint(out, trainable, load_tokenizer(model), manifest)
    return out


@pytest.fixture(scope="module")
def ckpt(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(model_dir, tmp_path_factory.mktemp("ckpt") / "lora")


@pytest.fixture
def vllm(ckpt: Path, model_dir: Path) -> Iterator[VLLMPolicy]:
    policy = VLLMPolicy(HFEngine(str(model_dir), str(ckpt / "tokenizer")), load_tokenizer(ckpt / "tokenizer"))
    policy.load_checkpoint(ckpt)
    yield policy
    policy.close()


def _requests(policy: HFPolicy | VLLMPolicy, role: str) -> list[GenRequest]:
    return [GenRequest(role, [Segment("prompt", t, policy.encode(t, "prompt"))], view=None) for t in PROMPTS]  # type: ignore[arg-type]


def _same(got: list[Generation], want: list[Generation]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids and g.text == w.text and g.finish_reason == w.finish_reason
        assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-5)


def test_each_role_generates_through_its_own_adapter(vllm: VLLMPolicy, ckpt: Path) -> None:
    reference = HFPolicy.load(ckpt)
    for role in ("planner", "reflector"):
        _same(
            vllm.generate(_requests(vllm, role), GREEDY),
            reference.generate(_requests(reference, role), GREEDY),
        )
    planner, reflector = vllm.handles["planner"], vllm.handles["reflector"]
    assert planner.path == ckpt / "planner" and reflector.path == ckpt / "reflector"
    assert planner.name != reflector.name and 0 < planner.id != reflector.id
    assert vllm.info.version == 2


def test_new_weights_are_new_lora_requests_checked_before_use(vllm: VLLMPolicy, ckpt: Path) -> None:
    old = dict(vllm.handles)
    engine = vllm.engine
    assert isinstance(engine, HFEngine)
    updated = _perturb(HFPolicy.load(ckpt), seed=7, version=3)
    engine.calls.clear()
    vllm.load_state(export_state(updated))
    new = vllm.handles
    assert vllm.info.version == 3
    assert {h.name for h in new.values()}.isdisjoint(h.name for h in old.values())
    assert {h.id for h in new.values()}.isdisjoint(h.id for h in old.values())
    assert all(h.path.is_dir() for h in old.values())  # the checkpoint's adapters are left alone
    # The sanity generation went through each new adapter, greedy, before anything else.
    sanity = engine.calls[0]
    assert {r.adapter for r in sanity} == set(new.values()) and all(
        r.sampling.temperature == 0 for r in sanity
    )
    for role in ("planner", "reflector"):
        _same(
            vllm.generate(_requests(vllm, role), GREEDY), updated.generate(_requests(updated, role), GREEDY)
        )
    # The next version replaces the scratch copies of this one.
    vllm.load_state(export_state(_perturb(updated, seed=8, version=4)))
    assert not any(h.path.exists() for h in new.values())


def test_an_adapter_that_fails_its_sanity_generation_is_not_served(
    vllm: VLLMPolicy, ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serving = dict(vllm.handles)
    broken = Generation(text="", token_ids=[], logprobs=[], finish_reason="error", error="CUDA error")
    monkeypatch.setattr(vllm.engine, "generate", lambda requests: [broken for _ in requests])
    with pytest.raises(AdapterError, match=r"sanity generation: CUDA error; still serving version 2"):
        vllm.load_state(export_state(_perturb(HFPolicy.load(ckpt), seed=9, version=3)))
    assert vllm.handles == serving and vllm.info.version == 2


def test_requests_that_cannot_run_get_context_or_error_generations(
    vllm: VLLMPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    too_long = SamplingParams(max_new_tokens=vllm.engine.max_positions or 0)
    gens = vllm.generate(_requests(vllm, "planner"), too_long)
    assert all(g.finish_reason == "context" and "positions" in (g.error or "") for g in gens)

    def crash(requests: Sequence[EngineRequest]) -> list[Generation]:
        raise RuntimeError("engine died")

    monkeypatch.setattr(vllm.engine, "generate", crash)
    gens = vllm.generate(_requests(vllm, "planner"), GREEDY)
    assert [g.error for g in gens] == ["engine failed: RuntimeError: engine died"] * len(PROMPTS)


def test_requests_sample_with_their_own_seeds(vllm: VLLMPolicy) -> None:
    engine = vllm.engine
    assert isinstance(engine, HFEngine)
    engine.calls.clear()
    vllm.generate(_requests(vllm, "planner"), SamplingParams(temperature=1.0, seed=5, max_new_tokens=4))
    seeds = [r.sampling.seed for r in engine.calls[0]]
    assert len(set(seeds)) == len(PROMPTS) and 5 not in seeds


def test_the_loop_records_the_same_episodes_as_with_hf(vllm: VLLMPolicy, ckpt: Path) -> None:
    tasks = list_tasks("household", "train", 2, 0)
    cfg = LoopConfig(trials=2, max_steps=2)
    reference = HFPolicy.load(ckpt)
    got = run_trials("household", tasks, vllm, vllm, cfg).records
    want = run_trials("household", tasks, reference, reference, cfg).records
    assert [r.role for r in got] == [r.role for r in want] and any(r.role == "reflector" for r in got)
    for g, w in zip(got, want, strict=True):
        assert g.model_dump(exclude={"behaviour_logprobs", "source"}) == w.model_dump(
            exclude={"behaviour_logprobs", "source"}
        )
        assert torch.allclose(
            torch.tensor(g.behaviour_logprobs), torch.tensor(w.behaviour_logprobs), atol=1e-5
        )


def test_rollouts_with_vllm_generation_serve_the_drivers_weights(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("retroact.models.vllm_policy.VLLMEngine", HFEngine)
    driver = _perturb(HFPolicy.load(ckpt), seed=11, version=6)
    tasks = list_tasks("household", "train", 2, 0)
    cfg = LoopConfig(trials=1, max_steps=2)
    with Rollouts(RolloutConfig(generation={"backend": "vllm"}), ckpt) as rollouts:
        got = rollouts.run("household", tasks, driver, cfg).records
    want = run_trials("household", tasks, driver, driver, cfg).records
    assert {(r.source, r.adapter_version) for r in got} == {("driver", 6)}
    assert [r.output_ids for r in got] == [r.output_ids for r in want]


def test_checkpoints_the_engine_cannot_serve_are_refused(
    model_dir: Path, tmp_path: Path, vllm: VLLMPolicy
) -> None:
    with pytest.raises(ValueError, match="LoRA checkpoints only"):
        VLLMPolicy.from_checkpoint(_checkpoint(model_dir, tmp_path / "full", "full"))
    lora = _checkpoint(model_dir, tmp_path / "lora")
    manifest = load_manifest(lora)
    save_manifest(lora, manifest.model_copy(update={"roles": {"planner": "planner"}}))
    with pytest.raises(ValueError, match="no reflector adapter; the vLLM backend serves one per role"):
        vllm.load_checkpoint(lora)
    save_manifest(lora, manifest)
    vllm.settings = VLLMSettings(max_lora_rank=2)
    with pytest.raises(AdapterError, match="rank 4 > vllm.max_lora_rank 2"):
        vllm.load_checkpoint(lora)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_without_vllm_the_engine_says_how_to_install() -> None:
    with pytest.raises(ImportError, match=r"pip install 'retroact\[vllm\]'"):
        VLLMEngine("model", "tokenizer", VLLMSettings())
