"""Trajectory records: one per planner trial and one per reflection, persisted as JSONL.

Token ids are the source of truth: a record produced by a tokenised policy keeps the prompt ids,
the output ids (model tokens and env tokens interleaved, as the model saw them), a loss mask that
is 1 exactly on model-written tokens, and the behaviour log-prob of each sampled token (0.0 on
masked positions). Records of text-only policies (scripted or API experts) keep the text
segments; a student's dataset tokenises those segments once, segment by segment.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, computed_field, model_validator

from retroact.models.base import Segment


class OutputSegment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["model", "env", "mistake"]
    """``mistake``: a deliberate wrong line of a scripted expert, in context but never trained on."""
    text: str


class TrajectoryRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    env: str
    split: str
    task_id: str
    role: Literal["planner", "reflector"]
    trial: int
    """0-based trial index."""
    adapter_version: int = 0
    source: str
    """Who wrote the model text, e.g. ``expert:household`` or ``hf:runs/demo/il``."""
    prompt: str
    segments: list[OutputSegment]
    prompt_ids: list[int] | None = None
    output_ids: list[int] | None = None
    loss_mask: list[int] | None = None
    behaviour_logprobs: list[float] | None = None
    reward: float = 0.0
    """Planner: the trial's reward R(τ_k). Reflector: R(τ_k) of the trial it reflects on."""
    success: bool = False
    next_reward: float | None = None
    """Reflector only: R(τ_{k+1}) of the trial that followed, None if there was none."""
    n_steps: int = 0
    error: str | None = None
    """Why the episode failed (env error, timeout, bad output); such records are kept, not trained on."""
    info: dict[str, object] = {}

    @model_validator(mode="before")
    @classmethod
    def _drop_derived(cls, data: object) -> object:
        # ``output`` is written for readers such as ``datasets.load_dataset("json")``; it is derived.
        if isinstance(data, dict) and "output" in data:
            data = {k: v for k, v in data.items() if k != "output"}
        return data

    @model_validator(mode="after")
    def _token_fields_agree(self) -> TrajectoryRecord:
        token_fields = (self.prompt_ids, self.output_ids, self.loss_mask, self.behaviour_logprobs)
        present = [f is not None for f in token_fields]
        if any(present) and not all(present):
            raise ValueError("prompt_ids, output_ids, loss_mask and behaviour_logprobs go together")
        if self.output_ids is not None:
            n = len(self.output_ids)
            if len(self.loss_mask or []) != n or len(self.behaviour_logprobs or []) != n:
                raise ValueError(
                    f"output_ids ({n}), loss_mask ({len(self.loss_mask or [])}) and behaviour_logprobs "
                    f"({len(self.behaviour_logprobs or [])}) must have the same length"
                )
            if any(m not in (0, 1) for m in self.loss_mask or []):
                raise ValueError("loss_mask holds only 0 and 1")
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def output(self) -> str:
        return "".join(s.text for s in self.segments)

    @property
    def tokenized(self) -> bool:
        return self.output_ids is not None

    @property
    def uid(self) -> str:
        return f"{self.env}/{self.split}/{self.task_id}/{self.trial}/{self.role}/v{self.adapter_version}"


def flatten_output(segments: Iterable[Segment]) -> tuple[list[int], list[int], list[float]]:
    """Output ids, loss mask (1 on model tokens) and behaviour log-probs of tokenised segments."""
    ids: list[int] = []
    mask: list[int] = []
    logprobs: list[float] = []
    for seg in segments:
        if seg.token_ids is None:
            raise ValueError(f"{seg.kind} segment has no token ids")
        ids.extend(seg.token_ids)
        is_model = seg.kind == "model"
        mask.extend([int(is_model)] * len(seg.token_ids))
        if is_model:
            if seg.logprobs is None or len(seg.logprobs) != len(seg.token_ids):
                raise ValueError("model segment needs one behaviour log-prob per sampled token")
            logprobs.extend(seg.logprobs)
        else:
            logprobs.extend([0.0] * len(seg.token_ids))
    return ids, mask, logprobs


class RecordFileError(ValueError):
    """A JSONL file of records is malformed; the message names the file and line."""


def write_records(path: str | Path, records: Iterable[TrajectoryRecord]) -> int:
    """Write records to ``path`` atomically (temp file + rename). Returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(rec.model_dump_json() + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return n


def append_records(path: str | Path, records: Iterable[TrajectoryRecord]) -> int:
    """Append records and fsync; readers ignore a torn last line left by a kill."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [rec.model_dump_json() + "\n" for rec in records]
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())
    return len(lines)


def iter_records(path: str | Path, *, tolerate_torn_tail: bool = True) -> Iterator[TrajectoryRecord]:
    """Read records back exactly. Malformed lines raise :class:`RecordFileError` naming file:line.

    A last line without its newline is what a kill during an append leaves behind; it is skipped
    when ``tolerate_torn_tail`` (the append that wrote it never completed).
    """
    path = Path(path)
    if not path.exists():
        raise RecordFileError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        torn = i == len(lines) and not line.endswith("\n")
        try:
            yield TrajectoryRecord.model_validate_json(line)
        except ValidationError as err:
            if torn and tolerate_torn_tail:
                return
            raise RecordFileError(f"{path}:{i}: not a valid trajectory record: {_short(err)}") from None


def read_records(path: str | Path) -> list[TrajectoryRecord]:
    return list(iter_records(path))


def _short(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "record"
    return f"{where}: {first['msg']} ({err.error_count()} error(s))"


def dump_json(path: str | Path, obj: object) -> None:
    """Write JSON atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
