"""HotpotQA data: loading the official JSON format, our train/test splits, and where the files live.

A HotpotQA file is a JSON list of questions, each with ``_id``, ``question``, ``answer``,
``context`` ([title, [sentence, ...]] pairs), ``supporting_facts`` ([title, sentence index]
pairs), ``type`` and ``level``. Any file in that format (e.g. the full distractor-setting dev or
train file) can replace the bundled samples.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from retroact.envs.base import Task
from retroact.paths import data_root

DATA_DIR = "hotpotqa"
TEST_FILES = ("hotpot_distractor_dev_hard100.json",)
TRAIN_FILES = ("hotpot_distractor_train_easy100.json", "hotpot_distractor_train_medium100.json")
FIREACT_FILE = "fireact_hotpotqa_gpt4_trajectories_alpaca.json"
ENV_OVERRIDE = {"train": "RETROACT_HOTPOTQA_TRAIN", "test": "RETROACT_HOTPOTQA_TEST"}
"""Environment variables that replace a split's files (paths joined with ``os.pathsep``)."""

_REQUIRED = {"_id": str, "question": str, "answer": str, "context": list, "supporting_facts": list}


class HotpotQADataError(ValueError):
    """A HotpotQA file is malformed; the message names the file, record index and field."""


@dataclass(frozen=True)
class Paragraph:
    title: str
    sentences: tuple[str, ...]
    """HotpotQA keeps each sentence's leading space; ``text`` joins them as the source did."""

    @property
    def text(self) -> str:
        return "".join(self.sentences).strip()

    def sentences_with(self, keyword: str) -> list[int]:
        """Indices of the sentences containing ``keyword`` (case-insensitive substring), in order."""
        key = keyword.casefold()
        return [i for i, s in enumerate(self.sentences) if key in s.casefold()]


def paragraphs(payload: dict[str, Any]) -> list[Paragraph]:
    """The context paragraphs of a task payload."""
    return [Paragraph(title, tuple(sents)) for title, sents in payload["context"]]


def _check_record(rec: object, where: str) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise HotpotQADataError(f"{where}: expected an object, got {type(rec).__name__}")
    for key, kind in _REQUIRED.items():
        if key not in rec:
            raise HotpotQADataError(f"{where}: missing field {key!r}")
        if not isinstance(rec[key], kind):
            raise HotpotQADataError(f"{where}: field {key!r} should be a {kind.__name__}")
    for j, item in enumerate(rec["context"]):
        ok = (
            isinstance(item, list | tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], list)
            and all(isinstance(s, str) for s in item[1])
        )
        if not ok:
            raise HotpotQADataError(f"{where}: context[{j}] should be [title, [sentence, ...]]")
    titles = {item[0]: len(item[1]) for item in rec["context"]}
    for j, fact in enumerate(rec["supporting_facts"]):
        if not (isinstance(fact, list | tuple) and len(fact) == 2 and isinstance(fact[0], str)
                and isinstance(fact[1], int)):
            raise HotpotQADataError(f"{where}: supporting_facts[{j}] should be [title, sentence index]")
        if fact[0] not in titles:
            raise HotpotQADataError(f"{where}: supporting_facts[{j}] names {fact[0]!r}, not in the context")
    return rec


def load_file(path: str | Path) -> list[dict[str, Any]]:
    """Validated records of one HotpotQA JSON file; errors name the file and record index."""
    path = Path(path)
    if not path.is_file():
        raise HotpotQADataError(f"{path}: no such HotpotQA file (see `retroact data`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise HotpotQADataError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(data, list):
        raise HotpotQADataError(f"{path}: expected a JSON list of questions")
    return [_check_record(rec, f"{path}: record {i}") for i, rec in enumerate(data)]


def to_task(rec: dict[str, Any], split: str) -> Task:
    """A task whose payload is the record's HotpotQA fields (plain JSON)."""
    payload = {
        "question": rec["question"],
        "answer": rec["answer"],
        "type": rec.get("type", ""),
        "level": rec.get("level", ""),
        "supporting_facts": [list(f) for f in rec["supporting_facts"]],
        "context": [[title, list(sents)] for title, sents in rec["context"]],
    }
    return Task(id=rec["_id"], split=split, payload=payload)


def split_files(split: str) -> tuple[Path, ...]:
    """The files of ``split``: the env-var override if set, else the bundled samples under the data root."""
    if split not in ENV_OVERRIDE:
        raise ValueError(f"hotpotqa has no split {split!r}; splits: train, test")
    override = os.environ.get(ENV_OVERRIDE[split])
    if override:
        return tuple(Path(p).expanduser() for p in override.split(os.pathsep) if p)
    names = TEST_FILES if split == "test" else TRAIN_FILES
    return tuple(data_root() / DATA_DIR / name for name in names)


@lru_cache(maxsize=8)
def _load_tasks(files: tuple[Path, ...], split: str) -> tuple[Task, ...]:
    tasks: list[Task] = []
    seen: dict[str, Path] = {}
    for path in files:
        for i, rec in enumerate(load_file(path)):
            if rec["_id"] in seen:
                raise HotpotQADataError(
                    f"{path}: record {i}: duplicate _id {rec['_id']!r} (also in {seen[rec['_id']]})")
            seen[rec["_id"]] = path
            tasks.append(to_task(rec, split))
    return tuple(tasks)


def load_split(split: str, files: Sequence[str | Path] | None = None) -> list[Task]:
    """All tasks of ``split`` in file order.

    Without ``files``, the configured split files are read and checked to share no id or question
    with the other split.
    """
    chosen = tuple(Path(f) for f in files) if files is not None else split_files(split)
    tasks = list(_load_tasks(chosen, split))
    if files is None:
        other = "train" if split == "test" else "test"
        check_disjoint(tasks, _load_tasks(split_files(other), other))
    return tasks


def check_disjoint(a: Iterable[Task], b: Iterable[Task]) -> None:
    """Raise if two task lists share an id or a question text."""
    a = list(a)
    b = list(b)
    ids = {t.id for t in a} & {t.id for t in b}
    questions = {t.payload["question"] for t in a} & {t.payload["question"] for t in b}
    if ids or questions:
        example = next(iter(ids or questions))
        raise HotpotQADataError(
            f"train and test overlap in {len(ids)} ids and {len(questions)} questions, e.g. {example!r}"
        )


def split_manifest(split: str) -> dict[str, Any]:
    """What a result should record about a split: its files, their sha256 and the task count."""
    files = split_files(split)
    return {
        "split": split,
        "files": [{"path": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in files],
        "n_tasks": len(_load_tasks(files, split)),
    }


def all_paragraphs(files: Iterable[Path]) -> list[Paragraph]:
    """Every distinct paragraph (by title, first seen wins) in the given files."""
    seen: dict[str, Paragraph] = {}
    for path in files:
        for rec in load_file(path):
            for title, sents in rec["context"]:
                seen.setdefault(title, Paragraph(title, tuple(sents)))
    return list(seen.values())


def describe() -> str:
    """Where HotpotQA data comes from and how to use the full official files (for ``retroact data``)."""
    root = data_root() / DATA_DIR
    lines = [
        "HotpotQA (distractor setting)",
        f"  data folder: {root}  ({'found' if root.is_dir() else 'MISSING'})",
        f"  test split : {', '.join(TEST_FILES)} (the 100 hard dev questions Reflexion evaluated on)",
        f"  train split: {', '.join(TRAIN_FILES)} (200 HotpotQA train questions)",
        f"  FireAct GPT-4 trajectories for IL import: {FIREACT_FILE}",
        "  Search runs over each question's own 10 context paragraphs (corpus='task'), or over every",
        "  paragraph of the loaded files (corpus='all'); nothing is fetched from Wikipedia.",
        "",
        "Using the full HotpotQA files (needs internet once):",
        "  1. Download the official distractor-setting files from the HotpotQA website",
        "     (hotpotqa.github.io): hotpot_train_v1.1.json and hotpot_dev_distractor_v1.json.",
        "  2. Point the splits at them (several files per split are joined with ':' on Unix):",
        f"       export {ENV_OVERRIDE['train']}=/path/to/hotpot_train_v1.1.json",
        f"       export {ENV_OVERRIDE['test']}=/path/to/hotpot_dev_distractor_v1.json",
        "     or set RETROACT_DATA to a folder holding hotpotqa/ with the sample file names above.",
        "  Any file in the official format works; train and test must not share questions.",
    ]
    return "\n".join(lines)
