"""HFPolicy: batched sampling, behaviour log-probs, stops, adapters and checkpoints on a tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, ViTConfig

from retroact.agent.loop import LoopConfig, run_trials
from retroact.envs import get_spec
from retroact.models.base import Generation, GenRequest, Segment
from retroact.models.base import SamplingParams as SP
from retroact.models.checkpoint import MANIFEST, CheckpointManifest, save_manifest
from retroact.models.hf import HFPolicy, ModelPathError
from retroact.models.logprobs import collate, token_logprobs
from retroact.models.prefix_cache import CachedRow, PrefixCache
from tests.tiny import HOUSEHOLD, make_tiny_model, overfit

PROMPTS = ["> go to desk 1\n", "Your task is to: put a pen in drawer.\n> go to drawer 1\nThe", "> "]
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test model, briefly trained on the household text so greedy decoding writes real lines."""
    path = make_tiny_model(tmp_path_factory.mktemp("hf"))
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = AutoTokenizer.from_pretrained(path)(HOUSEHOLD, return_tensors="pt")["input_ids"]
    overfit(model, ids, 60)
    model.save_pretrained(path)
    return path


@pytest.fixture
def policy(model_dir: Path) -> HFPolicy:
    return HFPolicy.load(model_dir)


def requests(policy: HFPolicy, texts: list[str] = PROMPTS, role: str = "planner") -> list[GenRequest]:
    return [
        GenRequest(role, [Segment("prompt", t, policy.encode(t, "prompt"))], view=None)  # type: ignore[arg-type]
        for t in texts
    ]


def recompute(
    policy: HFPolicy, reqs: list[GenRequest], gens: list[Generation], temperature: float
) -> torch.Tensor:
    batch = collate([r.token_ids for r in reqs], [g.token_ids or [] for g in gens], policy.pad_id)
    with torch.no_grad():
        logp, _ = token_logprobs(policy.models["planner"], batch, temperature=temperature)
    return logp


def test_encode_adds_bos_only_to_prompts(policy: HFPolicy) -> None:
    tok = policy.tokenizer
    ids = policy.encode("> go to desk 1\n", "env")
    assert policy.encode("> go to desk 1\n", "model") == ids
    assert policy.encode("> go to desk 1\n", "prompt") == [tok.bos_token_id, *ids]
    assert tok.bos_token_id not in ids and policy.decode(ids) == "> go to desk 1\n"


def test_greedy_batched_equals_one_at_a_time(policy: HFPolicy) -> None:
    sampling = SP(temperature=0.0, max_new_tokens=12, stop=())
    batched = policy.generate(requests(policy), sampling)
    policy.batch_size = 2  # chunked batches give the same answers
    assert [g.token_ids for g in policy.generate(requests(policy), sampling)] == [
        g.token_ids for g in batched
    ]
    for req, gen in zip(requests(policy), batched, strict=True):
        (single,) = policy.generate([req], sampling)
        assert single.token_ids == gen.token_ids and single.text == gen.text
        assert single.logprobs == pytest.approx(gen.logprobs, abs=1e-5)
        assert gen.finish_reason == "length" and len(gen.token_ids or []) == 12


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_behaviour_logprobs_equal_teacher_forced_recompute(policy: HFPolicy, temperature: float) -> None:
    reqs = requests(policy)
    gens = policy.generate(reqs, SP(temperature=temperature, max_new_tokens=16, stop=("\n",), seed=3))
    lengths = {len(g.token_ids or []) for g in gens}
    assert len(lengths) > 1, "rows should finish at different steps (exercises pruning)"
    ref = recompute(policy, reqs, gens, temperature if temperature > 0 else 1.0)
    for row, gen in enumerate(gens):
        n = len(gen.token_ids or [])
        assert n == len(gen.logprobs or [])
        torch.testing.assert_close(torch.tensor(gen.logprobs), ref[row, :n], atol=1e-4, rtol=0)
        assert policy.decode(gen.token_ids or []) == gen.text


@pytest.mark.parametrize("lora", [False, True])
def test_head_only_logprobs_equal_the_full_forward(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, lora: bool
) -> None:
    """Logits at target tokens only (backbone + LM head) give the full forward's log-probs,
    entropies and gradients, with and without a LoRA adapter."""
    from retroact.models import logprobs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if lora:
        model = get_peft_model(model, LORA)
    assert logprobs._backbone_and_head(model) is not None
    batch = collate([[1, 5, 9, 12], [1, 7]], [[3, 4, 8], [6, 2, 2, 9, 11]], pad_id=0)

    def run() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        logp, entropy = logprobs.token_logprobs(model, batch, temperature=0.7, with_entropy=True)
        assert entropy is not None
        (logp.sum() + entropy.sum()).backward()
        return logp, entropy, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    head_only = run()
    monkeypatch.setattr(logprobs, "_backbone_and_head", lambda model: None)
    full = run()
    assert (head_only[0] != 0).sum() == batch.target_mask.sum()
    torch.testing.assert_close(head_only[0], full[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head_only[1], full[1], atol=1e-5, rtol=1e-5)
    assert len(head_only[2]) == len(full[2]) > 0
    for a, b in zip(head_only[2], full[2], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_sampling_is_seeded(policy: HFPolicy) -> None:
    def ids(seed: int) -> list[list[int] | None]:
        return [
            g.token_ids for g in policy.generate(requests(policy), SP(temperature=1.0, stop=(), seed=seed))
        ]

    assert ids(5) == ids(5)
    assert ids(5) != ids(6)


def test_tiny_top_p_is_greedy_with_logprob_zero(policy: HFPolicy) -> None:
    greedy = policy.generate(requests(policy), SP(temperature=0.0, max_new_tokens=8, stop=()))
    nucleus = policy.generate(requests(policy), SP(temperature=1.0, top_p=1e-6, max_new_tokens=8, stop=()))
    assert [g.token_ids for g in nucleus] == [g.token_ids for g in greedy]
    assert all(lp == 0.0 for g in nucleus for lp in g.logprobs or [])


def test_stop_string_keeps_the_completing_token(policy: HFPolicy) -> None:
    (free,) = policy.generate(requests(policy, PROMPTS[:1]), SP(max_new_tokens=30, stop=()))
    assert "\n" in free.text, free.text
    for stop in ["\n", free.text[5:7], free.text[12:20]]:  # one- and multi-token stops
        (gen,) = policy.generate(requests(policy, PROMPTS[:1]), SP(max_new_tokens=30, stop=("zzz", stop)))
        ids = gen.token_ids or []
        assert gen.finish_reason == "stop"
        assert stop in gen.text and stop not in policy.decode(ids[:-1])
        assert gen.text == policy.decode(ids) and ids == (free.token_ids or [])[: len(ids)]


def test_eos_stops_and_is_kept(model_dir: Path) -> None:
    policy = HFPolicy.load(model_dir)
    (free,) = policy.generate(requests(policy, PROMPTS[:1]), SP(max_new_tokens=20, stop=()))
    free_ids = free.token_ids or []
    eos = free_ids[4]
    policy.models["planner"].generation_config.eos_token_id = eos
    (gen,) = policy.generate(requests(policy, PROMPTS[:1]), SP(max_new_tokens=20, stop=()))
    assert gen.finish_reason == "eos"
    assert gen.token_ids == free_ids[: free_ids.index(eos) + 1]


def test_bad_requests_become_error_generations(policy: HFPolicy) -> None:
    reqs = requests(policy, ["> go to desk 1\n", "x" * 3000, ""])
    reqs[2].segments = [Segment("prompt", "> ")]  # never tokenised
    gens = policy.generate(reqs, SP(max_new_tokens=4, stop=()))
    assert [g.finish_reason for g in gens] == ["length", "context", "error"]
    assert "2048 positions" in (gens[1].error or "") and "not tokenised" in (gens[2].error or "")


def test_generation_restores_train_mode(policy: HFPolicy) -> None:
    model = policy.models["planner"]
    model.train()
    policy.generate(requests(policy, PROMPTS[:1]), SP(max_new_tokens=2))
    assert model.training


def two_adapters(model_dir: Path) -> PeftModel:
    torch.manual_seed(1)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LORA, adapter_name="planner")
    peft.add_adapter("reflector", LORA)
    return peft


def logprobs_by_role(policy: HFPolicy) -> dict[str, list[float]]:
    sampling = SP(max_new_tokens=10, stop=())
    return {
        r: policy.generate(requests(policy, role=r), sampling)[1].logprobs or []
        for r in ("planner", "reflector")
    }


def test_lora_adapters_per_role_and_checkpoint_round_trip(model_dir: Path, tmp_path: Path) -> None:
    peft = two_adapters(model_dir)
    for name in ("planner", "reflector"):  # a trainer's state that generation must not change
        peft.set_requires_grad(name, True)
    policy = HFPolicy(
        peft, AutoTokenizer.from_pretrained(model_dir), {"planner": "planner", "reflector": "reflector"}
    )
    base = HFPolicy.load(model_dir)
    out, base_out = logprobs_by_role(policy), logprobs_by_role(base)
    assert out["planner"] != pytest.approx(out["reflector"], abs=1e-3)
    assert out["planner"] != pytest.approx(base_out["planner"], abs=1e-3)
    assert all(p.requires_grad for n, p in peft.named_parameters() if "lora_" in n)
    mixed = policy.generate(
        requests(policy, role="reflector") + requests(policy), SP(max_new_tokens=10, stop=())
    )
    assert [mixed[1].logprobs, mixed[4].logprobs] == [out["reflector"], out["planner"]]

    ckpt = tmp_path / "ckpt"
    peft.save_pretrained(ckpt)
    policy.tokenizer.save_pretrained(ckpt / "tokenizer")
    roles = {"planner": "planner", "reflector": "reflector"}
    save_manifest(
        ckpt, CheckpointManifest(base_model=str(model_dir), finetune="lora", roles=roles, version=3)
    )
    loaded = HFPolicy.load(ckpt)
    assert loaded.info.version == 3 and loaded.adapters == roles
    for role, lps in logprobs_by_role(loaded).items():
        assert lps == pytest.approx(out[role], abs=1e-5)


def test_shared_lora_adapter_serves_both_roles(model_dir: Path, tmp_path: Path) -> None:
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LORA, adapter_name="shared")
    peft.save_pretrained(tmp_path)
    roles = {"planner": "shared", "reflector": "shared"}
    save_manifest(tmp_path, CheckpointManifest(base_model=str(model_dir), finetune="lora", roles=roles))
    loaded = HFPolicy.load(tmp_path)
    assert loaded.adapters == {"planner": "shared", "reflector": "shared"}
    out = logprobs_by_role(loaded)
    assert out["planner"] == out["reflector"]


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_a_role_without_a_directory_runs_the_base_model(
    model_dir: Path, tmp_path: Path, finetune: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`retroact il` with `roles: [planner]` writes such a checkpoint (eval pairs it with a reflector)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if finetune == "lora":
        get_peft_model(model, LORA, adapter_name="planner").save_pretrained(tmp_path)
    else:
        with torch.no_grad():
            model.model.norm.weight.mul_(0.5)
        model.save_pretrained(tmp_path / "planner")
    roles = {"planner": "planner"}
    save_manifest(tmp_path, CheckpointManifest(base_model=str(model_dir), finetune=finetune, roles=roles))
    loaded = HFPolicy.load(tmp_path)
    assert "no directory for reflector; that role runs the base model" in caplog.text
    out, base = logprobs_by_role(loaded), logprobs_by_role(HFPolicy.load(model_dir))
    assert out["reflector"] == pytest.approx(base["reflector"], abs=1e-5)
    assert out["planner"] != pytest.approx(base["planner"], abs=1e-3)


def test_full_models_per_role(model_dir: Path, tmp_path: Path) -> None:
    for sub, scale in (("planner", 1.0), ("reflector", 0.5)):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        with torch.no_grad():
            model.model.norm.weight.mul_(scale)
        model.save_pretrained(tmp_path / sub)
    roles = {"planner": "planner", "reflector": "reflector"}
    save_manifest(tmp_path, CheckpointManifest(base_model=str(model_dir), finetune="full", roles=roles))
    loaded = HFPolicy.load(tmp_path)  # no tokenizer dir: falls back to the base model's
    out = logprobs_by_role(loaded)
    assert out["planner"] == pytest.approx(logprobs_by_role(HFPolicy.load(model_dir))["planner"], abs=1e-5)
    assert out["planner"] != pytest.approx(out["reflector"], abs=1e-3)

    save_manifest(
        tmp_path,
        CheckpointManifest(
            base_model=str(model_dir), finetune="full", roles=dict.fromkeys(roles, "reflector")
        ),
    )
    shared = HFPolicy.load(tmp_path)
    assert shared.models["planner"] is shared.models["reflector"]


def test_load_errors(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelPathError, match="missing: model directory not found"):
        HFPolicy.load(tmp_path / "missing")
    with pytest.raises(ModelPathError, match="no-org/no-model: no such directory, nor a hub model"):
        HFPolicy.load("no-org/no-model")  # offline in tests: the hub is not asked
    ViTConfig().save_pretrained(tmp_path / "vit")
    with pytest.raises(ModelPathError, match="vit: not a causal language model"):
        HFPolicy.load(tmp_path / "vit")

    (tmp_path / MANIFEST).write_text(
        json.dumps({"base_model": str(model_dir), "finetune": "qlora", "roles": {}})
    )
    with pytest.raises(ValueError, match=f"{MANIFEST}: invalid checkpoint manifest"):
        HFPolicy.load(tmp_path)
    save_manifest(tmp_path, CheckpointManifest(base_model=str(model_dir), finetune="lora", roles={}))
    with pytest.raises(ValueError, match="roles: no role directory at all"):
        HFPolicy.load(tmp_path)
    roles = {"planner": "p", "reflector": "r"}
    save_manifest(tmp_path, CheckpointManifest(base_model=str(model_dir), finetune="lora", roles=roles))
    with pytest.raises(FileNotFoundError, match="roles.planner: directory .* does not exist"):
        HFPolicy.load(tmp_path)
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    with pytest.raises(ValueError, match="p: cannot load the LoRA adapter"):
        HFPolicy.load(tmp_path)


def test_models_go_where_retroact_device_says(monkeypatch: pytest.MonkeyPatch) -> None:
    from retroact.models.hf import default_device

    monkeypatch.setenv("RETROACT_DEVICE", "meta")
    assert default_device() == torch.device("meta")
    monkeypatch.delenv("RETROACT_DEVICE")
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def _prefilled(policy: HFPolicy) -> list[int]:
    """Counts the input tokens (padding included) of every prefill forward, the one that reads a
    request's context (token-by-token decoding forwards do not pass ``logits_to_keep``)."""
    fed: list[int] = []
    policy.models["planner"].register_forward_pre_hook(
        lambda _m, _a, kw: fed.append(kw["input_ids"].numel()) if "logits_to_keep" in kw else None,
        with_kwargs=True,
    )
    return fed


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_carried_kv_cache_gives_the_same_records_from_fewer_tokens(
    model_dir: Path, temperature: float
) -> None:
    """Household episodes with the step-to-step key/value cache equal those re-reading every context."""
    spec = get_spec("household")
    tasks = spec.tasks("train", 6, 0)
    config = LoopConfig(trials=2, max_steps=8, temperature=temperature, batch_size=4)
    runs = {}
    for budget in (0, 1 << 30):
        policy = HFPolicy(
            AutoModelForCausalLM.from_pretrained(model_dir),
            AutoTokenizer.from_pretrained(model_dir),
            prefix_cache_bytes=budget,
        )
        fed = _prefilled(policy)
        runs[budget] = run_trials(spec, tasks, policy, policy, config).records, sum(fed)
    (plain, plain_fed), (cached, cached_fed) = runs.values()
    assert [r.output_ids for r in cached] == [r.output_ids for r in plain]
    for a, b in zip(cached, plain, strict=True):
        assert a.behaviour_logprobs is not None and b.behaviour_logprobs is not None
        torch.testing.assert_close(torch.tensor(a.behaviour_logprobs), torch.tensor(b.behaviour_logprobs))
    if temperature > 0:  # greedy, this model repeats its first action: trials end after two steps
        assert cached_fed < plain_fed / 3


def test_prefix_cache_takes_the_longest_proper_prefix_and_forgets_other_owners() -> None:
    def row(ids: tuple[int, ...]) -> CachedRow:
        return CachedRow(ids, [torch.zeros(1, len(ids), 2)], [torch.zeros(1, len(ids), 2)])

    cache = PrefixCache(max_bytes=1 << 20)
    assert cache.take("v0", [1, 2, 3]) is None
    for ids in [(1,), (1, 2), (1, 2, 3), (4, 5)]:
        cache.put(row(ids))
    hit = cache.take("v0", [1, 2, 3])
    assert hit is not None and hit.ids == (1, 2)  # (1, 2, 3) would leave nothing to feed
    assert cache.take("v0", [1, 2, 3]) is not None and len(cache) == 2  # now (1,)
    assert cache.take("v1", [4, 5, 6]) is None and len(cache) == 0  # new weights: old keys are useless
    small = PrefixCache(max_bytes=row((1, 2)).nbytes * 2)
    for ids in [(1, 2), (3, 4), (5, 6)]:
        small.put(row(ids))
    assert small.take(None, [1, 2, 9]) is None and small.take(None, [5, 6, 9]) is not None  # oldest evicted
