"""Trajectory record invariants and exact JSONL round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retroact.agent.records import (
    OutputSegment,
    RecordFileError,
    TrajectoryRecord,
    append_records,
    flatten_output,
    read_records,
    write_records,
)
from retroact.models.base import Segment

ids = st.lists(st.integers(0, 50_000), min_size=0, max_size=20)
floats = st.floats(-50, 0, allow_nan=False)


@st.composite
def segments(draw: st.DrawFn) -> list[Segment]:
    out = []
    for kind in draw(st.lists(st.sampled_from(["model", "env"]), min_size=1, max_size=6)):
        toks = draw(ids)
        text = draw(st.text(max_size=30))
        lps = draw(st.lists(floats, min_size=len(toks), max_size=len(toks))) if kind == "model" else None
        out.append(Segment(kind, text, toks, lps))
    return out


def _record(segs: list[Segment], **kw: object) -> TrajectoryRecord:
    out_ids, mask, lps = flatten_output(segs)
    return TrajectoryRecord(
        env="household",
        split="train",
        task_id="t",
        role="planner",
        trial=0,
        source="test",
        prompt="p",
        segments=[OutputSegment(kind=s.kind, text=s.text) for s in segs],  # type: ignore[arg-type]
        prompt_ids=[1, 2],
        output_ids=out_ids,
        loss_mask=mask,
        behaviour_logprobs=lps,
        **kw,
    )


@settings(max_examples=60, deadline=None)
@given(segments())
def test_mask_covers_exactly_model_tokens_and_round_trips(segs: list[Segment]) -> None:
    rec = _record(segs)
    assert rec.output_ids is not None and rec.loss_mask is not None
    assert len(rec.output_ids) == len(rec.loss_mask) == len(rec.behaviour_logprobs or [])
    assert sum(rec.loss_mask) == sum(len(s.token_ids or []) for s in segs if s.kind == "model")
    assert rec.output == "".join(s.text for s in segs)
    assert TrajectoryRecord.model_validate_json(rec.model_dump_json()) == rec


def test_inconsistent_token_fields_are_rejected() -> None:
    rec = _record([Segment("model", "a", [5, 6], [-1.0, -2.0])])
    data = rec.model_dump()
    with pytest.raises(ValueError, match="same length"):
        TrajectoryRecord.model_validate({**data, "loss_mask": [1]})
    with pytest.raises(ValueError, match="go together"):
        TrajectoryRecord.model_validate({**data, "prompt_ids": None})
    with pytest.raises(ValueError, match="one behaviour log-prob"):
        flatten_output([Segment("model", "a", [5, 6], [-1.0])])


def test_files_round_trip_and_errors_name_the_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    recs = [_record([Segment("model", "go\n", [3], [-0.25])], reward=r) for r in (0.0, 1.0)]
    path = tmp_path / "r.jsonl"
    write_records(path, recs[:1])
    append_records(path, recs[1:])
    assert read_records(path) == recs
    with path.open("a") as f:
        f.write('{"env": "torn')  # a kill in the middle of an append
    assert read_records(path) == recs
    path.write_text(recs[0].model_dump_json() + "\n{not json}\n" + recs[1].model_dump_json() + "\n")
    with pytest.raises(RecordFileError, match=r"r\.jsonl:2"):
        read_records(path)
    with pytest.raises(RecordFileError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")
