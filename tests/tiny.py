"""A very small Llama + BPE tokenizer for fast tests (about a second to build)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from retroact.agent.records import read_records
from retroact.models.tiny import TinyModelConfig, build_tiny_model

HOUSEHOLD = (
    "You are in the middle of a room. Looking quickly around you, you see a cabinet 1, a desk 1, "
    "a drawer 2, a drawer 1, a shelf 1, and a sidetable 1.\nYour task is to: put a pen in drawer.\n"
    "> go to desk 1\nOn the desk 1, you see a pen 1, a mug 2, and a book 1.\n"
    "> take pen 1 from desk 1\nYou pick up the pen 1 from the desk 1.\n"
    "> go to drawer 1\nThe drawer 1 is closed.\n> open drawer 1\nYou open the drawer 1.\n"
    "> put pen 1 in/on drawer 1\nYou put the pen 1 in/on the drawer 1.\n"
)
"""A templated household trajectory: the default tokenizer training text."""

SMALL = TinyModelConfig(
    vocab_size=400, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_positions=2048
)


def make_tiny_model(
    tmp_path: Path, texts: Iterable[str] | None = None, config: TinyModelConfig = SMALL
) -> Path:
    """Build the test model under ``tmp_path/tiny`` and return its directory."""
    return build_tiny_model(tmp_path / "tiny", texts if texts is not None else [HOUSEHOLD] * 4, config)


def make_data_model(tmp_path: Path, data: Path) -> Path:
    """The test model with its tokenizer trained on the IL records of a ``collect`` directory.

    Household trajectories come out about half as long as under the default tokenizer (trained on
    one short text), which halves the time of the tests that train on them.
    """
    records = [r for role in ("planner", "reflector") for r in read_records(data / f"{role}.jsonl")]
    texts = [r.prompt + r.output for r in records]
    return make_tiny_model(tmp_path, texts, SMALL.model_copy(update={"vocab_size": 1024}))


def overfit(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> None:
    """Fit the model to one token sequence (so greedy sampling reproduces it): deterministic."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
