"""LLM experts for `collect`: strict reply parsing, the request budget, the resumable call cache,
zero-shot student samples, and the CLI with API and local HF experts."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from retroact.agent.loop import LoopConfig
from retroact.agent.records import read_records
from retroact.cli import app
from retroact.data.collect import CACHE_FILE, collect
from retroact.envs import get_spec
from retroact.models import openai_policy
from retroact.models.base import GenRequest, SamplingParams, Segment
from retroact.models.chat import SegmentEncoder
from retroact.models.openai_policy import BudgetExhausted, CallCache, OpenAIPolicy, strict_line
from tests.test_chat_format import replay_experts
from tests.tiny import make_tiny_model


class FakeChat:
    """Stands in for the OpenAI client: answers each call with ``answer(user message)``, counts calls."""

    def __init__(self, answer: Callable[[str], str]) -> None:
        self.answer = answer
        self.calls: list[dict[str, Any]] = []
        self.chat = SimpleNamespace(completions=self)

    def create(self, **params: Any) -> SimpleNamespace:
        self.calls.append(params)
        text = self.answer(params["messages"][-1]["content"])
        message = SimpleNamespace(content=text)
        return SimpleNamespace(choices=[SimpleNamespace(message=message, finish_reason="stop")])


def household_answer(prompt: str) -> str:
    """An expert that echoes the step prefix and the reflection label (strict parsing removes them)."""
    if prompt.endswith("Reflection:"):
        return "Reflection: I only looked around; next time I will open the drawers first."
    return "> look"


def api_expert(fake: FakeChat, **kw: Any) -> OpenAIPolicy:
    policy = OpenAIPolicy("gpt-test", base_url="http://127.0.0.1:9/v1", concurrency=1, strict=True, **kw)
    policy.client = fake  # type: ignore[assignment]
    return policy


def request(text: str = "You are in a room.\n> ") -> GenRequest:
    return GenRequest("planner", [Segment("prompt", text)], view=None)  # type: ignore[arg-type]


def test_strict_line() -> None:
    assert strict_line("> go to desk 1", "> ") == "go to desk 1"
    assert strict_line("\n  open drawer 1  \n", "> ") == "open drawer 1"
    assert strict_line("Reflection: I missed it.", "Reflection:") == "I missed it."
    assert strict_line("go to desk 1\ntake pen 1", "> ") is None
    assert strict_line(">", "> ") is None and strict_line("  \n", "") is None


def test_strict_replies_become_one_line_or_an_error() -> None:
    replies = iter(["> go to desk 1", "go to desk 1\nopen it", ""])
    policy = api_expert(FakeChat(lambda _: next(replies)))
    gens = policy.generate([request(f"room {i}\n> ") for i in range(3)], SamplingParams())
    assert [g.text for g in gens] == ["go to desk 1\n", "", ""]
    assert [g.finish_reason for g in gens] == ["stop", "error", "error"]
    assert "one line" in (gens[1].error or "")


def test_cache_answers_repeated_calls_for_free(tmp_path: Path) -> None:
    fake = FakeChat(lambda prompt: "look")
    first = api_expert(fake, cache=tmp_path / "cache.jsonl")
    reqs = [request("room A\n> "), request("room B\n> ")]
    assert [g.text for g in first.generate(reqs, SamplingParams())] == ["look\n", "look\n"]
    again = api_expert(fake, cache=tmp_path / "cache.jsonl")  # a rerun reads the file
    assert [g.text for g in again.generate(reqs, SamplingParams())] == ["look\n", "look\n"]
    assert len(fake.calls) == 2 and (again.requests_sent, again.cache_hits) == (0, 2)
    # Other sampling settings are another call; sampled calls are keyed by their seed too.
    again.generate(reqs[:1], SamplingParams(max_new_tokens=7))
    again.generate(reqs[:1], SamplingParams(temperature=1.0, seed=1))
    again.generate(reqs[:1], SamplingParams(temperature=1.0, seed=2))
    again.generate(reqs[:1], SamplingParams(temperature=1.0, seed=2))
    assert len(fake.calls) == 5 and len(CallCache(tmp_path / "cache.jsonl")) == 5


def test_cache_file_problems(tmp_path: Path) -> None:
    path = tmp_path / "cache.jsonl"
    good = json.dumps({"key": "k1", "text": "look", "finish": "stop"})
    path.write_text(good + '\n{"key": "k2", "te')  # a kill during the last append
    assert len(CallCache(path)) == 1 and CallCache(path).get("k1") == ("look", "stop")
    path.write_text(good + "\nnot json\n" + good + "\n")
    with pytest.raises(ValueError, match=r"cache.jsonl:2: not a cached call"):
        CallCache(path)


def test_budget_counts_every_request_sent() -> None:
    fake = FakeChat(lambda _: "look")
    policy = api_expert(fake, max_requests=2)
    policy.generate([request("a\n> "), request("b\n> ")], SamplingParams())
    with pytest.raises(BudgetExhausted, match="budget of 2 exhausted"):
        policy.generate([request("c\n> ")], SamplingParams())
    assert len(fake.calls) == policy.requests_sent == 2
    with pytest.raises(ValueError, match="max_requests"):
        api_expert(fake, max_requests=-1)


def test_budget_stop_and_rerun_never_pay_twice(tmp_path: Path) -> None:
    fake = FakeChat(household_answer)
    out = tmp_path / "data"
    cfg = LoopConfig(trials=2, fewshot=True)

    def run(budget: int | None) -> dict[str, object]:
        expert = api_expert(fake, max_requests=budget)
        return collect("household", expert, expert, out, n_tasks=6, config=cfg, chunk_size=2)

    with pytest.raises(BudgetExhausted):
        run(12)  # a chunk of 2 tasks takes 10 calls: 2 steps and 1 reflection per task, then 2 steps
    assert len(fake.calls) == 12 and not (out / "stats.json").exists()
    assert len(json.loads((out / "progress.json").read_text())["done"]) == 2
    stats = run(None)
    assert stats["expert_calls"] == {"requests_sent": 18, "cache_hits": 2}  # the stopped chunk's 2
    assert len(fake.calls) == len(CallCache(out / CACHE_FILE)) == 30
    assert run(None)["episodes"] == 6 and len(fake.calls) == 30
    records = read_records(out / "trajectories.jsonl")
    actions = {s.text for r in records if r.role == "planner" for s in r.segments if s.kind == "model"}
    reflections = {r.output for r in records if r.role == "reflector"}
    assert actions == {"look\n"} and len(records) == 18
    assert reflections == {"I only looked around; next time I will open the drawers first.\n"}


def test_student_samples_are_zero_shot_text(tmp_path: Path) -> None:
    """A few-shot tokenised expert's samples equal a zero-shot text expert's: exemplars cut from both
    roles' prompts, the expert's token ids dropped."""
    enc = SegmentEncoder(AutoTokenizer.from_pretrained(make_tiny_model(tmp_path)))
    style = get_spec("household").prompts
    zero = collect("household", *get_spec("household").experts(), tmp_path / "zero", n_tasks=8)
    few = collect(
        "household", *replay_experts(enc), tmp_path / "few", n_tasks=8, config=LoopConfig(fewshot=True)
    )
    assert few["kept"] == zero["kept"] and zero["kept"]["reflector"] > 0  # type: ignore[index]
    raw = read_records(tmp_path / "few" / "trajectories.jsonl")
    assert all(r.tokenized and style.fewshot.strip()[:40] in r.prompt for r in raw if r.role == "planner")
    for role in ("planner", "reflector"):
        got = read_records(tmp_path / "few" / f"{role}.jsonl")
        want = read_records(tmp_path / "zero" / f"{role}.jsonl")
        assert [r.prompt for r in got] == [r.prompt for r in want] and not any(r.tokenized for r in got)
        assert [r.output for r in got] == [r.output for r in want]


def test_cli_collect_with_an_api_expert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeChat(household_answer)
    monkeypatch.setattr(openai_policy.openai, "OpenAI", lambda **kw: fake)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    args = ["collect", "--expert", "openai:gpt-test", "--tasks", "4", "--trials", "2", "--out", str(tmp_path)]
    res = CliRunner().invoke(app, [*args, "--max-requests", "3"])
    assert res.exit_code == 3 and "request budget of 3 exhausted" in res.output, res.output
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "API requests sent" in res.output and (tmp_path / CACHE_FILE).is_file()
    assert "Example of a solved task:" in fake.calls[0]["messages"][-1]["content"]  # few-shot exemplars


def test_cli_collect_with_a_local_hf_expert(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path)
    out = tmp_path / "data"
    res = CliRunner().invoke(
        app,
        [
            "collect",
            "--expert",
            str(model),
            "--tasks",
            "3",
            "--trials",
            "1",
            "--max-steps",
            "2",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    stats = json.loads((out / "stats.json").read_text())
    assert stats["episodes"] == 3 and stats["expert"]["planner"] == "tiny" and "expert_calls" not in stats
    assert all(r.tokenized for r in read_records(out / "trajectories.jsonl"))
