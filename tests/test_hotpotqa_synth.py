"""hotpotqa-synth: deterministic generation, entity-disjoint splits, answerable tasks, expert behaviour."""

from __future__ import annotations

import re
from collections import Counter

from retroact.agent.loop import LoopConfig, run_trials
from retroact.envs import get_spec, list_tasks, make_env
from retroact.envs.hotpotqa_synth import POOL_SIZE, generate
from retroact.envs.qa_metrics import SPECIAL_ANSWERS, contains_answer

_YEAR = re.compile(r"^\d{3,4}$")


def _entities(split: str) -> set[str]:
    """Every entity named as a title or a non-year, non-yes/no answer in a split."""
    names: set[str] = set()
    for task in generate().tasks[split]:
        names |= {title for title, _ in task.payload["context"]}
        answer = task.payload["answer"]
        if not _YEAR.match(answer) and answer not in SPECIAL_ANSWERS:
            names.add(answer)
    return names


def test_generation_is_deterministic_and_sized() -> None:
    data = generate()
    assert {s: len(t) for s, t in data.tasks.items()} == POOL_SIZE
    generate.cache_clear()
    again = generate()
    assert again.tasks == data.tasks and again.paragraphs == data.paragraphs
    sample = list_tasks("hotpotqa-synth", "test", 10, seed=3)
    assert sample == list_tasks("hotpotqa-synth", "test", 10, seed=3)
    assert sample != list_tasks("hotpotqa-synth", "test", 10, seed=4)
    assert sample[0].id.startswith("synth-test-") and len(list_tasks("hotpotqa-synth", "train")) == 2000


def test_splits_are_disjoint_by_entities() -> None:
    train, test = _entities("train"), _entities("test")
    assert len(train) > 1000 and len(test) > 300
    assert not train & test
    all_titles = [p.title for p in generate().paragraphs]
    assert len(all_titles) == len(set(all_titles))


def test_tasks_are_well_formed_and_answerable() -> None:
    for split, tasks in generate().tasks.items():
        types = Counter(t.payload["type"] for t in tasks)
        assert 0.2 < types["comparison"] / len(tasks) < 0.4, (split, types)
        assert len({t.payload["question"] for t in tasks}) == len(tasks)
        for task in tasks:
            p = task.payload
            context = {title: sents for title, sents in p["context"]}
            assert len(context) == 10 and task.split == split
            facts = [context[title][i] for title, i in p["supporting_facts"]]
            answer = p["answer"]
            if p["type"] == "bridge":
                # The answer is written in the second hop's supporting sentence.
                assert answer in facts[-1], (task.id, facts)
                assert p["supporting_facts"][0][0] in p["question"]
            elif answer in SPECIAL_ANSWERS:
                assert p["question"].startswith("Were ")
            else:
                assert answer in {title for title, _ in p["supporting_facts"]}


def test_comparison_answers_follow_the_facts() -> None:
    for task in generate().tasks["test"]:
        p = task.payload
        if p["type"] != "comparison" or p["answer"] in SPECIAL_ANSWERS:
            continue
        (a, ia), (b, ib) = p["supporting_facts"]
        context = {title: sents for title, sents in p["context"]}
        years = [int(re.findall(r"\b\d{3,4}\b", context[t][i])[0]) for t, i in ((a, ia), (b, ib))]
        assert p["answer"] == (a if years[0] < years[1] else b)


def test_env_plays_synthetic_tasks_and_searches_both_worlds() -> None:
    task = list_tasks("hotpotqa-synth", "test", 1)[0]
    env = make_env("hotpotqa-synth", corpus="all")
    env.reset(task)
    train_title = generate().tasks["train"][0].payload["context"][0][0]
    assert env.step(f"Action: Search[{train_title}]").observation.startswith(f"Observation: [{train_title}] ")
    res = env.step(f"Action: Finish[{task.payload['answer'].upper()}]")
    assert res.done and res.reward == 1.0 and res.info["success"] is True


def test_expert_learns_from_reflection_on_synth() -> None:
    spec = get_spec("hotpotqa-synth")
    assert spec.max_steps == 5 and spec.memory_size is None and spec.prompts == get_spec("hotpotqa").prompts
    planner, reflector = spec.experts()
    tasks = list_tasks("hotpotqa-synth", "test")
    result = run_trials("hotpotqa-synth", tasks, planner, reflector, LoopConfig(trials=3))
    ir, fr = result.per_trial_success[0], result.per_trial_success[-1]
    assert 0.55 < ir < 0.85 and fr == 1.0 and result.n_errors == 0
    assert result.n_valid_actions == result.n_actions
    gold = {t.id: t.payload["answer"] for t in tasks}
    reflections = [r for r in result.records if r.role == "reflector"]
    assert len(reflections) == round((1 - ir) * len(tasks))
    assert not any(contains_answer(r.output, gold[r.task_id]) for r in reflections)
