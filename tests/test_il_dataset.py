"""IL data: records -> token examples (exact masks, ids kept as recorded) -> length-bucketed batches."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch

from retroact.agent.records import OutputSegment, RecordFileError, TrajectoryRecord, write_records
from retroact.data.il_dataset import (
    ILDataError,
    ILExample,
    collate_examples,
    length_batches,
    load_role_data,
    padded_size,
)
from retroact.models.tiny import train_tokenizer

OBJECTS = ["apple", "mug", "book", "key", "pen", "plate", "towel", "lamp"]
PLACES = ["desk 1", "shelf 2", "drawer 3", "table 1", "sink 1", "fridge 1", "cabinet 4"]


def planner_record(i: int, rng: random.Random, **fields: object) -> TrajectoryRecord:
    """A household-like text record: model action lines interleaved with env observations."""
    obj, goal = rng.choice(OBJECTS), rng.choice(PLACES)
    segments: list[OutputSegment] = []
    for _ in range(rng.randint(1, 6)):
        place = rng.choice(PLACES)
        segments.append(OutputSegment(kind="model", text=f"go to {place}\n"))
        segments.append(
            OutputSegment(kind="env", text=f"You arrive at {place}. You see a {rng.choice(OBJECTS)}.\n> ")
        )
    segments.append(OutputSegment(kind="model", text=f"put {obj} in/on {goal}\n"))
    base: dict[str, object] = dict(
        env="household",
        split="train",
        task_id=f"t{i}",
        role="planner",
        trial=0,
        source="expert:test",
        prompt=f"Interact with a household to solve a task.\nYour task is to: put a {obj} in {goal}.\n> ",
        segments=segments,
        reward=1.0,
        success=True,
    )
    return TrajectoryRecord.model_validate(base | fields)


def reflector_record(i: int, rng: random.Random, **fields: object) -> TrajectoryRecord:
    obj = rng.choice(OBJECTS)
    text = f"I looked for the {obj} in the wrong place. Next time I will check {rng.choice(PLACES)} first.\n"
    base: dict[str, object] = dict(
        env="household",
        split="train",
        task_id=f"t{i}",
        role="reflector",
        trial=0,
        source="expert:test",
        prompt=f"You failed to find the {obj}.\nReflection: ",
        segments=[OutputSegment(kind="model", text=text)],
        next_reward=1.0,
    )
    return TrajectoryRecord.model_validate(base | fields)


def write_il_data(out: Path, n_planner: int, n_reflector: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    write_records(out / "planner.jsonl", [planner_record(i, rng) for i in range(n_planner)])
    write_records(out / "reflector.jsonl", [reflector_record(i, rng) for i in range(n_reflector)])
    return out


def corpus() -> list[str]:
    rng = random.Random(1)
    recs = [planner_record(i, rng) for i in range(60)] + [reflector_record(i, rng) for i in range(30)]
    return [r.prompt + r.output for r in recs]


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return train_tokenizer(corpus(), vocab_size=400)


def test_text_records_are_tokenised_segment_by_segment(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(0)
    rec = planner_record(0, rng)
    write_records(tmp_path / "planner.jsonl", [rec])
    data = load_role_data(tmp_path, "planner", tokenizer, max_length=4096)
    (ex,) = data.examples
    assert ex.prompt_ids == [tokenizer.bos_token_id] + tokenizer.encode(rec.prompt, add_special_tokens=False)
    expected_ids: list[int] = []
    expected_mask: list[int] = []
    for seg in rec.segments:
        ids = tokenizer.encode(seg.text, add_special_tokens=False)
        expected_ids += ids
        expected_mask += [int(seg.kind == "model")] * len(ids)
    assert ex.output_ids == expected_ids
    assert ex.target_mask == expected_mask
    assert tokenizer.eos_token_id not in ex.output_ids
    assert tokenizer.decode(ex.output_ids) == rec.output
    # The model tokens alone decode to exactly the model-written text.
    model_text = "".join(s.text for s in rec.segments if s.kind == "model")
    assert (
        tokenizer.decode([t for t, m in zip(ex.output_ids, ex.target_mask, strict=True) if m]) == model_text
    )
    assert 0 < ex.n_target < len(ex.output_ids)


def test_trajectory_scope_counts_every_output_token(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    write_il_data(tmp_path, 5, 1)
    data = load_role_data(tmp_path, "planner", tokenizer, max_length=4096, loss_scope="trajectory")
    assert all(ex.target_mask == [1] * len(ex.output_ids) for ex in data.examples)


def test_mistake_lines_are_read_but_never_trained_on(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    rec = planner_record(0, random.Random(0))
    mistake = [OutputSegment(kind="mistake", text="take mug 2 from desk 1\n"),
               OutputSegment(kind="env", text="Nothing happens.\n> ")]
    rec = rec.model_copy(update={"segments": rec.segments[:2] + mistake + rec.segments[2:]})
    write_records(tmp_path / "planner.jsonl", [rec])
    for scope, trained in (("model_tokens", {"model"}), ("trajectory", {"model", "env"})):
        (ex,) = load_role_data(tmp_path, "planner", tokenizer, max_length=4096, loss_scope=scope).examples
        want_ids: list[int] = []
        want_mask: list[int] = []
        for seg in rec.segments:
            ids = tokenizer.encode(seg.text, add_special_tokens=False)
            want_ids += ids
            want_mask += [int(seg.kind in trained)] * len(ids)
        # The student reads the mistake as its own line (same ids in context) but has no target on it.
        assert ex.output_ids == want_ids and ex.target_mask == want_mask, scope
        start = sum(len(tokenizer.encode(s.text, add_special_tokens=False)) for s in rec.segments[:2])
        n = len(tokenizer.encode(mistake[0].text, add_special_tokens=False))
        assert ex.target_mask[start : start + n] == [0] * n


def test_tokenised_records_keep_their_ids(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    # Ids that are not what the text would tokenise to: they must be used verbatim.
    rec = reflector_record(0, random.Random(0)).model_copy(
        update=dict(
            prompt_ids=[1, 7, 8],
            output_ids=[9, 10, 11, 12],
            loss_mask=[1, 0, 1, 1],
            behaviour_logprobs=[-0.1, 0.0, -0.2, -0.3],
        )
    )
    write_records(tmp_path / "reflector.jsonl", [rec])
    (ex,) = load_role_data(tmp_path, "reflector", tokenizer, max_length=64).examples
    assert (ex.prompt_ids, ex.output_ids, ex.target_mask) == ([1, 7, 8], [9, 10, 11, 12], [1, 0, 1, 1])
    (ex,) = load_role_data(tmp_path, "reflector", tokenizer, max_length=64, loss_scope="trajectory").examples
    assert ex.target_mask == [1, 1, 1, 1]


def test_drops_are_counted_and_warned(tmp_path: Path, tokenizer, caplog) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(0)
    short = [planner_record(i, rng) for i in range(6)]
    lengths = [load_one(tmp_path, r, tokenizer).n_tokens for r in short]
    limit = max(lengths) - 1
    failed = planner_record(99, rng, error="env timeout")
    env_only = planner_record(100, rng, segments=[OutputSegment(kind="env", text="Nothing happens.\n")])
    write_records(tmp_path / "planner.jsonl", [*short, failed, env_only])
    with caplog.at_level(logging.WARNING, logger="retroact.data.il_dataset"):
        data = load_role_data(tmp_path, "planner", tokenizer, max_length=limit)
    n_long = sum(n > limit for n in lengths)
    assert data.records == 8
    assert data.dropped == {"error": 1, "too_long": n_long, "no_target": 1}
    assert len(data.examples) == 6 - n_long
    assert all(ex.n_tokens <= limit for ex in data.examples)
    assert f"dropped {n_long} of 8 records (too_long)" in caplog.text


def load_one(tmp_path: Path, rec: TrajectoryRecord, tokenizer) -> ILExample:  # type: ignore[no-untyped-def]
    d = tmp_path / "one"
    write_records(d / f"{rec.role}.jsonl", [rec])
    return load_role_data(d, rec.role, tokenizer, max_length=10**6).examples[0]


def test_bad_data_names_the_file_and_line(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ILDataError, match="IL data directory not found"):
        load_role_data(tmp_path / "nope", "planner", tokenizer, max_length=64)
    with pytest.raises(ILDataError, match=r"planner\.jsonl: no planner data"):
        load_role_data(tmp_path, "planner", tokenizer, max_length=64)
    (tmp_path / "planner.jsonl").write_text("\n")
    with pytest.raises(ILDataError, match=r"planner\.jsonl: holds no records"):
        load_role_data(tmp_path, "planner", tokenizer, max_length=64)
    good = planner_record(0, random.Random(0)).model_dump_json()
    (tmp_path / "planner.jsonl").write_text(
        good + "\n" + json.dumps({"role": "planner"}) + "\n" + good + "\n"
    )
    with pytest.raises(RecordFileError, match=r"planner\.jsonl:2: not a valid trajectory record"):
        load_role_data(tmp_path, "planner", tokenizer, max_length=4096)
    write_records(tmp_path / "reflector.jsonl", [planner_record(0, random.Random(0))])
    with pytest.raises(ILDataError, match=r"reflector\.jsonl#1: record of role 'planner'"):
        load_role_data(tmp_path, "reflector", tokenizer, max_length=4096)
    big = reflector_record(0, random.Random(0)).model_copy(
        update=dict(prompt_ids=[1], output_ids=[10**6], loss_mask=[1], behaviour_logprobs=[0.0])
    )
    write_records(tmp_path / "reflector.jsonl", [big])
    with pytest.raises(ILDataError, match=r"reflector\.jsonl#1: token id beyond"):
        load_role_data(tmp_path, "reflector", tokenizer, max_length=4096)
    write_records(tmp_path / "reflector.jsonl", [reflector_record(0, random.Random(0))])
    with pytest.raises(ILDataError, match="no usable examples out of 1 records"):
        load_role_data(tmp_path, "reflector", tokenizer, max_length=3)


def synthetic_examples(n: int, seed: int) -> list[ILExample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, o = rng.randint(20, 120), rng.randint(5, 400)
        out.append(ILExample("planner", [1] * p, [2] * o, [1] * o, f"x#{i}"))
    return out


def test_length_batches_cover_everything_once_and_respect_caps() -> None:
    exs = synthetic_examples(300, 0)
    batches = length_batches(exs, batch_size=8, max_batch_tokens=1500, pool=64, rng=random.Random(3))
    assert sorted(i for b in batches for i in b) == list(range(300))
    assert all(len(b) <= 8 for b in batches)
    assert all(padded_size([exs[i] for i in b]) <= 1500 or len(b) == 1 for b in batches)
    again = length_batches(exs, batch_size=8, max_batch_tokens=1500, pool=64, rng=random.Random(3))
    assert again == batches


def test_bucketing_cuts_padding() -> None:
    exs = synthetic_examples(512, 1)
    real = sum(e.n_tokens for e in exs)

    def padding(batches: list[list[int]]) -> float:
        return 1 - real / sum(padded_size([exs[i] for i in b]) for b in batches)

    bucketed = length_batches(exs, batch_size=8, max_batch_tokens=None, pool=256, rng=random.Random(0))
    order = list(range(len(exs)))
    random.Random(0).shuffle(order)
    unsorted = [order[i : i + 8] for i in range(0, len(order), 8)]
    assert padding(bucketed) < 0.12 < 0.3 < padding(unsorted)


def test_collate_aligns_the_loss_mask_with_outputs() -> None:
    a = ILExample("planner", [1, 5], [6, 7, 8], [1, 0, 1], "a")
    b = ILExample("planner", [1], [9], [1], "b")
    batch = collate_examples([a, b], pad_id=0)
    assert batch.tokens.targets.tolist() == [[6, 7, 8], [9, 0, 0]]
    assert batch.loss_mask.tolist() == [[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    assert (batch.n_target, batch.n_tokens) == (3, 7)
    assert torch.equal(batch.tokens.input_ids[1, :2], torch.tensor([0, 1]))
