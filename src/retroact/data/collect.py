"""Stage-1 data: run an expert through the multi-trial loop, then keep what the evaluator approves.

``DIR/trajectories.jsonl`` holds every record the expert produced (failures too), appended task
chunk by task chunk; ``DIR/progress.json`` lists the finished task ids and is replaced atomically
after each chunk, so a killed collection resumes without losing or duplicating a task.
``DIR/planner.jsonl`` and ``DIR/reflector.jsonl`` are the filtered IL samples (SPEC §2.2) with
zero-shot prompts (SPEC §2.3), and ``DIR/stats.json`` counts what was kept and dropped, and why.

An API expert's calls are cached in ``DIR/expert_cache.jsonl`` as they return, so a rerun after a
kill or a spent request budget never pays twice for the same call.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from retroact.agent.loop import LoopConfig, run_trials
from retroact.agent.records import (
    TrajectoryRecord,
    append_records,
    dump_json,
    read_records,
    write_records,
)
from retroact.envs import get_spec, list_tasks
from retroact.models.base import Policy
from retroact.models.openai_policy import CallCache, OpenAIPolicy

log = logging.getLogger(__name__)

CACHE_FILE = "expert_cache.jsonl"


def filter_il_samples(
    records: Iterable[TrajectoryRecord], *, fewshot: bool = False
) -> tuple[list[TrajectoryRecord], list[TrajectoryRecord], dict[str, Counter[str]]]:
    """Planner samples = successful trials; reflector samples = reflections followed by a success."""
    planner: list[TrajectoryRecord] = []
    reflector: list[TrajectoryRecord] = []
    why: dict[str, Counter[str]] = {"planner": Counter(), "reflector": Counter()}
    for rec in records:
        reason = _drop_reason(rec)
        if reason:
            why[rec.role][reason] += 1
            continue
        why[rec.role]["kept"] += 1
        if fewshot:
            rec = _zero_shot(rec)
        (planner if rec.role == "planner" else reflector).append(rec)
    return planner, reflector, why


def _drop_reason(rec: TrajectoryRecord) -> str | None:
    if rec.error:
        return "error"
    if not rec.output.strip():
        return "empty output"
    if rec.role == "planner":
        return None if rec.success else "trial failed"
    if rec.next_reward is None:
        return "no later trial"
    return None if rec.success else "next trial failed"


def _mistakes(records: Iterable[TrajectoryRecord]) -> int:
    """Deliberate mistake lines of a scripted expert (``collect --mistakes``)."""
    return sum(seg.kind == "mistake" for rec in records for seg in rec.segments)


def _zero_shot(rec: TrajectoryRecord) -> TrajectoryRecord:
    """The student's sample: the expert's few-shot exemplars cut from the prompt (SPEC §2.3), and
    the expert's token ids dropped (the student tokenises the text its own way)."""
    style = get_spec(rec.env).prompts
    instruction, exemplars = (
        (style.planner_instruction, style.fewshot)
        if rec.role == "planner"
        else (style.reflector_instruction, style.reflector_fewshot)
    )
    head, block = instruction.strip() + "\n", exemplars.strip() + "\n"
    text = rec.prompt
    if exemplars.strip() and text.startswith(head + block):  # as agent.prompts lays prompts out
        text = head + text[len(head + block) :]
    return rec.model_copy(
        update={
            "prompt": text,
            "prompt_ids": None,
            "output_ids": None,
            "loss_mask": None,
            "behaviour_logprobs": None,
        }
    )


def collect(
    env: str,
    planner: Policy,
    reflector: Policy | None,
    out_dir: str | Path,
    *,
    split: str = "train",
    n_tasks: int | None = None,
    task_seed: int = 0,
    config: LoopConfig | None = None,
    chunk_size: int = 32,
    on_episode: Callable[[], None] | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
) -> dict[str, object]:
    """Collect (or resume collecting) expert data for IL; returns the stats written to stats.json.

    An API expert without a cache gets ``DIR/expert_cache.jsonl``. When its request budget runs
    out, :class:`~retroact.models.openai_policy.BudgetExhausted` propagates after the finished
    chunks are saved (no stats.json then: the collection is unfinished, and a rerun resumes it).
    """
    cfg = config or LoopConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    experts = [p for p in {id(p): p for p in (planner, reflector)}.values() if isinstance(p, OpenAIPolicy)]
    for expert in experts:
        if expert.cache is None:
            expert.cache = CallCache(out / CACHE_FILE)
    raw, progress_file = out / "trajectories.jsonl", out / "progress.json"
    tasks = list_tasks(env, split, n_tasks, task_seed)
    done: list[str] = json.loads(progress_file.read_text())["done"] if progress_file.exists() else []
    done_set = set(done)
    if raw.exists():  # drop records of a chunk that a kill interrupted before progress.json said so
        kept = [r for r in read_records(raw) if r.task_id in done_set]
        write_records(raw, kept)
    todo = [t for t in tasks if t.id not in done_set]
    if todo:  # stats of an earlier, smaller collection would claim this one is finished
        (out / "stats.json").unlink(missing_ok=True)
    if on_chunk:
        on_chunk(len(tasks) - len(todo), len(tasks))
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        result = run_trials(env, chunk, planner, reflector, cfg, on_episode=on_episode)
        append_records(raw, result.records)
        done += [t.id for t in chunk]
        dump_json(progress_file, {"done": done})
        if on_chunk:
            on_chunk(len(done), len(tasks))
    records = read_records(raw)
    planner_recs, reflector_recs, why = filter_il_samples(records, fewshot=cfg.fewshot)
    write_records(out / "planner.jsonl", planner_recs)
    write_records(out / "reflector.jsonl", reflector_recs)
    planner_trials = [r for r in records if r.role == "planner"]
    first = [r for r in planner_trials if r.trial == 0]
    stats: dict[str, object] = {
        "env": env,
        "split": split,
        "expert": {"planner": planner.info.name, "reflector": reflector.info.name if reflector else None},
        "episodes": len(first),
        "trials": len(planner_trials),
        "reflections": sum(r.role == "reflector" for r in records),
        "errors": sum(r.error is not None for r in records),
        "solved": len({r.task_id for r in planner_trials if r.success}),
        "trial1_success": sum(r.success for r in first) / max(len(first), 1),
        "kept": {"planner": len(planner_recs), "reflector": len(reflector_recs)},
        "mistakes": {"written": _mistakes(planner_trials), "in_kept": _mistakes(planner_recs)},
        "dropped": {role: {k: v for k, v in c.items() if k != "kept"} for role, c in why.items()},
        "config": cfg.model_dump(),
    }
    if experts:  # this call's usage; earlier runs' calls are the cache's replays
        stats["expert_calls"] = {
            "requests_sent": sum(e.requests_sent for e in experts),
            "cache_hits": sum(e.cache_hits for e in experts),
        }
    dump_json(out / "stats.json", stats)
    return stats
