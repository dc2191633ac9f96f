"""IL trainer: two adapters / shared / full checkpoints, exact resume after SIGKILL, bad inputs."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, ViTConfig

from retroact.agent.records import RecordFileError
from retroact.config import ConfigError, load_config
from retroact.data.il_dataset import ILDataError, collate_examples, encode_prompt, load_role_data
from retroact.models.checkpoint import load_manifest
from retroact.models.hf import HFPolicy, ModelPathError, load_tokenizer
from retroact.train import il
from retroact.train.common import (
    Trainable,
    load_model,
    make_optimizer,
)
from retroact.train.il import ILConfig, ILError, train_il
from tests.test_il_dataset import corpus, write_il_data
from tests.tiny import make_tiny_model

REPO = Path(__file__).resolve().parents[1]



def config(**fields: Any) -> ILConfig:
    return ILConfig(num_threads=1, **fields)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model"), corpus())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_il_data(tmp_path_factory.mktemp("il_data"), 24, 8)


def metrics(ckpt: Path) -> list[dict]:
    return [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]


def adapter_weights(ckpt: Path, unit: str) -> dict[str, torch.Tensor]:
    return load_file(ckpt / unit / "adapter_model.safetensors")


def test_two_adapters_train_on_their_own_data(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    cfg = config(epochs=3, lr=3e-3, batch_size=4)
    summary = train_il(data_dir, model_dir, tmp_path / "ckpt", cfg, progress=False)
    ckpt = Path(summary.out)

    manifest = load_manifest(ckpt)
    assert manifest.finetune == "lora" and manifest.stage == "il" and manifest.version == 0
    assert manifest.roles == {"planner": "planner", "reflector": "reflector"}
    assert manifest.base_model == str(model_dir.resolve())
    plan_steps = sum(len(il.epoch_plan(_examples(data_dir, model_dir, cfg), cfg, e)) for e in range(3))
    assert summary.total_steps == summary.optimizer_steps == plan_steps
    assert summary.skipped_steps == 0
    assert summary.units["planner"]["examples"] == 24 and summary.units["reflector"]["examples"] == 8

    train = [m for m in metrics(ckpt) if m["event"] == "train"]
    assert [m["step"] for m in train] == list(range(1, plan_steps + 1))
    assert {m["unit"] for m in train} == {"planner", "reflector"}
    for unit in ("planner", "reflector"):
        losses = [m["loss"] for m in train if m["unit"] == unit]
        assert sum(losses[-3:]) < sum(losses[:3])
    assert all(m["tokens_per_s"] > 0 for m in train)

    # The exported adapters load with PEFT, hold the trained weights, and change the base's output.
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        before = base(ids).logits
    peft_model = PeftModel.from_pretrained(base, ckpt / "planner", adapter_name="planner")
    peft_model.load_adapter(ckpt / "reflector", adapter_name="reflector")
    peft_model.eval()
    outs = {}
    for unit in ("planner", "reflector"):
        peft_model.set_adapter(unit)
        with torch.no_grad():
            outs[unit] = peft_model(ids).logits
        assert not torch.allclose(outs[unit], before, atol=1e-4)
    assert not torch.allclose(outs["planner"], outs["reflector"], atol=1e-4)
    state = torch.load(ckpt / "train_state.pt", weights_only=False)["weights"]
    for unit in ("planner", "reflector"):
        exported = adapter_weights(ckpt, unit)
        trained = {
            k.split("/", 1)[1].replace(f".{unit}.", "."): v for k, v in state.items() if k.startswith(unit)
        }
        assert exported.keys() == trained.keys() and len(exported) == 8  # A and B on q, v of 2 layers
        assert all(torch.equal(exported[k], trained[k]) for k in exported)
        assert any(v.abs().sum() > 0 for k, v in exported.items() if "lora_B" in k)
    assert (ckpt / "tokenizer" / "tokenizer.json").is_file()

    # Our policy loads it and tokenises prompts exactly as the IL data did.
    policy = HFPolicy.load(ckpt)
    text = "Your task is to: put a mug in shelf 2.\n> "
    assert policy.encode(text, "prompt") == encode_prompt(load_tokenizer(model_dir), text)


def _examples(data_dir: Path, model_dir: Path, cfg: ILConfig) -> dict:
    tok = load_tokenizer(model_dir)
    return {
        u: [e for r in roles for e in load_role_data(data_dir, r, tok, max_length=cfg.max_length).examples]
        for u, roles in cfg.units().items()
    }


def test_a_step_on_one_adapter_leaves_the_other_untouched(model_dir: Path, data_dir: Path) -> None:
    torch.manual_seed(0)
    trainable = Trainable.from_base(load_model(model_dir), "lora", ["planner", "reflector"])
    params = trainable.all_parameters()
    opt = make_optimizer(params, 1e-2, 0.0)
    reflector_before = [p.detach().clone() for p in trainable.parameters("reflector")]
    planner_before = [p.detach().clone() for p in trainable.parameters("planner")]
    exs = load_role_data(data_dir, "planner", load_tokenizer(model_dir), max_length=4096).examples[:4]
    batch = collate_examples(exs, 0)
    for _ in range(2):
        assert il._train_step(trainable, "planner", [(batch, 1.0)], opt, 1.0)[1] is not None
    assert all(
        torch.equal(a, b) for a, b in zip(reflector_before, trainable.parameters("reflector"), strict=True)
    )
    assert not all(
        torch.equal(a, b) for a, b in zip(planner_before, trainable.parameters("planner"), strict=True)
    )
    assert all(p not in opt.state for p in trainable.parameters("reflector"))


def test_gradient_accumulation_matches_one_big_batch(model_dir: Path, data_dir: Path) -> None:
    """Also: a weight-0 pass (what FSDP ranks with a smaller share run) changes nothing."""
    exs = load_role_data(data_dir, "planner", load_tokenizer(model_dir), max_length=4096).examples[:6]
    results = []
    for micro in ([(exs[:2], 1.0), (exs[2:3], 1.0), (exs[3:], 1.0), (exs[:1], 0.0)], [(exs, 1.0)]):
        trainable = Trainable.from_base(load_model(model_dir), "full", ["planner"])
        opt = make_optimizer(trainable.all_parameters(), 1e-3, 0.0)
        batches = [(collate_examples(m, 0), w) for m, w in micro]
        nll, norm = il._train_step(trainable, "planner", batches, opt, None)
        results.append((nll, norm, trainable.weights()))
    (nll_a, norm_a, w_a), (nll_b, norm_b, w_b) = results
    assert nll_a == pytest.approx(nll_b, rel=1e-5)
    assert norm_a == pytest.approx(norm_b, rel=1e-4)
    assert all(torch.allclose(w_a[k], w_b[k], atol=1e-6) for k in w_a)


def test_full_shared_checkpoint_round_trips(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    cfg = config(finetune="full", shared=True, epochs=1, lr=1e-3, batch_size=8, loss_scope="trajectory")
    summary = train_il(data_dir, model_dir, tmp_path / "ckpt", cfg, progress=False)
    manifest = load_manifest(tmp_path / "ckpt")
    assert manifest.finetune == "full" and manifest.roles == {"planner": "shared", "reflector": "shared"}
    assert summary.units["shared"]["examples"] == 32
    assert summary.units["shared"]["target_tokens"] == summary.units["shared"]["tokens"] - sum(
        len(e.prompt_ids) for e in _examples(data_dir, model_dir, cfg)["shared"]
    )
    loaded, _ = Trainable.from_checkpoint(tmp_path / "ckpt")
    trained = load_model(tmp_path / "ckpt" / "shared").state_dict()
    base = load_model(model_dir).state_dict()
    assert all(torch.equal(v, trained[k.split("/", 1)[1]]) for k, v in loaded.weights().items())
    assert not all(torch.equal(base[k], trained[k]) for k in base)


def test_non_finite_loss_skips_the_step(
    model_dir: Path,
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = {"n": 0}
    real = il.token_logprobs

    def flaky(model, batch, **kw):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        logp, ent = real(model, batch, **kw)
        return (logp * float("nan") if calls["n"] == 2 else logp), ent

    monkeypatch.setattr(il, "token_logprobs", flaky)
    cfg = config(finetune="full", roles=["planner"], epochs=1, lr=1e-3, batch_size=4)
    with caplog.at_level(logging.WARNING, logger="retroact.train.il"):
        summary = train_il(data_dir, model_dir, tmp_path / "ckpt", cfg, progress=False)
    assert summary.skipped_steps == 1
    assert summary.optimizer_steps == summary.total_steps - 1
    assert "step 2 (planner): loss or gradient not finite; step skipped" in caplog.text
    assert [m["step"] for m in metrics(tmp_path / "ckpt") if m["event"] == "skip"] == [2]
    assert all(torch.isfinite(p).all() for p in load_model(tmp_path / "ckpt" / "planner").parameters())


KILLED_RUN = """
import sys, time
from pathlib import Path
from retroact.train import il
real_step = il.clip_and_step
calls = 0
def slow_step(*args, **kwargs):
    global calls
    calls += 1
    if calls == {kill_at}:
        Path({marker!r}).touch()
        time.sleep(300)  # the parent SIGKILLs us here, mid-step
    return real_step(*args, **kwargs)
il.clip_and_step = slow_step
il.train_il({data!r}, {model!r}, {out!r}, il.ILConfig.model_validate_json({cfg!r}), progress=False)
"""


def test_resume_after_sigkill_matches_an_uninterrupted_run(
    model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    cfg = config(
        epochs=2, lr=3e-3, batch_size=3, grad_accum=2, save_every_steps=3, schedule="cosine", warmup_ratio=0.2
    )
    reference = train_il(data_dir, model_dir, tmp_path / "reference", cfg, progress=False)
    assert reference.total_steps == 12  # per epoch: 8 planner + 3 reflector batches, in pairs

    out, marker = tmp_path / "killed", tmp_path / "in_step"
    script = KILLED_RUN.format(
        kill_at=11,
        marker=str(marker),
        data=str(data_dir),
        model=str(model_dir),
        out=str(out),
        cfg=cfg.model_dump_json(),
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "the training subprocess never reached step 11"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert max(m["step"] for m in metrics(out)) == 10  # step 10 ran after the last save (step 9)

    resumed = train_il(data_dir, model_dir, out, cfg, progress=False)
    assert resumed.resumed_from_step == 9
    assert resumed.optimizer_steps == reference.optimizer_steps == reference.total_steps
    train_steps = [m["step"] for m in metrics(out) if m["event"] == "train"]
    assert train_steps == list(range(1, reference.total_steps + 1))
    for unit in ("planner", "reflector"):
        want, got = adapter_weights(tmp_path / "reference", unit), adapter_weights(out, unit)
        assert want.keys() == got.keys()
        assert all(torch.allclose(want[k], got[k], atol=1e-6) for k in want)

    # A finished run is not trained again; a different setting is refused.
    again = train_il(data_dir, model_dir, out, cfg, progress=False)
    assert again.resumed_from_step == again.optimizer_steps == reference.total_steps
    with pytest.raises(ILError, match=r"cannot resume a run with different settings \(lr: 0\.003 -> 0\.01\)"):
        train_il(data_dir, model_dir, out, cfg.model_copy(update={"lr": 1e-2}), progress=False)


def test_bad_inputs_name_the_problem(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelPathError, match="model directory not found"):
        train_il(data_dir, tmp_path / "nope", tmp_path / "c1", config(), progress=False)
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(
        ModelPathError, match=r"empty_model: not a Hugging Face model directory \(no config.json\)"
    ):
        train_il(data_dir, tmp_path / "empty_model", tmp_path / "c2", config(), progress=False)
    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(
        tmp_path / "vit"
    )
    with pytest.raises(ModelPathError, match="vit: not a causal language model"):
        train_il(data_dir, tmp_path / "vit", tmp_path / "c3", config(), progress=False)
    with pytest.raises(ILDataError, match="IL data directory not found"):
        train_il(tmp_path / "no_data", model_dir, tmp_path / "c4", config(), progress=False)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "planner.jsonl").write_text((data_dir / "planner.jsonl").read_text())
    with pytest.raises(ILDataError, match=r"reflector\.jsonl: no reflector data"):
        train_il(partial, model_dir, tmp_path / "c5", config(), progress=False)
    (partial / "reflector.jsonl").write_text('{"env": "household"\n{}\n')
    with pytest.raises(RecordFileError, match=r"reflector\.jsonl:1: not a valid trajectory record"):
        train_il(partial, model_dir, tmp_path / "c6", config(), progress=False)
    done = train_il(
        data_dir, model_dir, tmp_path / "c7", config(roles=["reflector"], epochs=1), progress=False
    )
    with pytest.raises(ModelPathError, match="is a RetroAct checkpoint, not a base model"):
        train_il(data_dir, done.out, tmp_path / "c8", config(), progress=False)
    (Path(done.out) / "train_state.pt").unlink()
    with pytest.raises(ILError, match="holds a checkpoint but no IL training state"):
        train_il(data_dir, model_dir, done.out, config(), progress=False)


def test_config_file(tmp_path: Path) -> None:
    example = load_config(REPO / "configs" / "il.yaml", ILConfig)
    assert example.model_dump() != ILConfig().model_dump()  # the example sets what it documents
    smollm2 = load_config(REPO / "configs" / "il-smollm2.yaml", ILConfig)
    assert (smollm2.lora.r, smollm2.max_steps, smollm2.roles) == (16, 200, ["planner"])
    assert ILConfig().lora.model_dump() == {
        "r": 8,
        "alpha": 16,
        "dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"],
    }
    bad = tmp_path / "il.yaml"
    bad.write_text("epochs: 2\nlearning_rate: 0.1\nlora:\n  rank: 4\n")
    with pytest.raises(ConfigError, match=r"il\.yaml: invalid ILConfig") as err:
        load_config(bad, ILConfig)
    assert "learning_rate: Extra inputs are not permitted" in str(err.value)
    assert "lora.rank: Extra inputs are not permitted" in str(err.value)
    bad.write_text("finetune: qlora\n")
    with pytest.raises(ConfigError, match="finetune: Input should be 'lora' or 'full'"):
        load_config(bad, ILConfig)
    assert load_config(None, ILConfig, shared=True, epochs=None).shared is True
