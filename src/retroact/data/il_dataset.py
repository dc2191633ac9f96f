"""Imitation-learning data: collected records -> token examples -> length-bucketed batches.

Records written by ``retroact collect`` live in ``DIR/planner.jsonl`` and ``DIR/reflector.jsonl``.
Records of a tokenised policy are used with their ids exactly as recorded. Text-only records (an
expert's) are tokenised for the student: the prompt with BOS first, the output segment by segment
without special tokens, so the loss mask is exact (1 on model segments, 0 on env segments) and env
text is split into tokens the same way the agent loop splits it at run time. No EOS is appended:
planner steps and reflections already end with a newline, which is where generation stops.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from retroact.agent.records import TrajectoryRecord, iter_records
from retroact.models.base import Role, SegmentKind
from retroact.models.chat import SegmentEncoder
from retroact.models.logprobs import TokenBatch, collate

log = logging.getLogger(__name__)

LossScope = Literal["model_tokens", "trajectory"]


class ILDataError(ValueError):
    """IL data is missing, empty or unusable; the message names the file (and record)."""


@dataclass(frozen=True)
class ILExample:
    role: Role
    prompt_ids: list[int]
    output_ids: list[int]
    target_mask: list[int]
    """1 where the output token counts in the loss (depends on the loss scope)."""
    where: str
    """``file#record`` for messages."""

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def n_target(self) -> int:
        return sum(self.target_mask)


@dataclass
class RoleData:
    """One role's examples and what happened to its records."""

    role: Role
    file: Path
    examples: list[ILExample] = field(default_factory=list)
    records: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """Reason -> count: ``error`` (episode failed), ``too_long`` (> max_length), ``no_target``."""

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    @property
    def tokens(self) -> int:
        return sum(e.n_tokens for e in self.examples)

    @property
    def target_tokens(self) -> int:
        return sum(e.n_target for e in self.examples)

    def summary(self) -> dict[str, object]:
        return {
            "file": str(self.file),
            "records": self.records,
            "examples": len(self.examples),
            "tokens": self.tokens,
            "target_tokens": self.target_tokens,
            "dropped": dict(self.dropped),
        }


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Prompt ids as the student sees them, in the tokenizer's prompt format (raw: BOS, then the text)."""
    return SegmentEncoder(tokenizer).encode(text, "prompt")


def load_role_data(
    data_dir: str | Path,
    role: Role,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    loss_scope: LossScope = "model_tokens",
) -> RoleData:
    """Read ``data_dir/<role>.jsonl`` and turn its records into examples.

    Records of failed episodes (``error`` set), examples longer than ``max_length`` tokens
    (prompt + output) and examples with no token to learn from are dropped and counted; dropping
    rather than truncating keeps every kept trajectory whole (a planner trajectory cut before its
    final action would teach an unfinished episode).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ILDataError(f"{data_dir}: IL data directory not found")
    file = data_dir / f"{role}.jsonl"
    if not file.is_file():
        raise ILDataError(f"{file}: no {role} data (expected the output of `retroact collect`)")
    data = RoleData(role=role, file=file)
    records: list[tuple[str, TrajectoryRecord]] = []
    for i, rec in enumerate(iter_records(file), start=1):
        data.records += 1
        where = f"{file}#{i}"
        if rec.role != role:
            raise ILDataError(f"{where}: record of role {rec.role!r} in the {role} file")
        if rec.error is not None:
            data.drop("error")
            continue
        records.append((where, rec))
    if data.records == 0:
        raise ILDataError(f"{file}: holds no records")

    # Text records are encoded as the agent loop would for this tokenizer's prompt format (raw or
    # chat, see models/chat.py), all pieces in one tokenizer call.
    # ``trajectory`` trains on observations too, as the reference code did, but never on a scripted
    # expert's deliberate mistakes. Only text records can tell those apart (the shipped experts that
    # make them are text-only); a tokenised record's mask does not say which 0s were mistakes.
    text_records = [(r.prompt, [(s.kind, s.text) for s in r.segments]) for _, r in records if not r.tokenized]
    trained: tuple[SegmentKind, ...] = ("model", "env") if loss_scope == "trajectory" else ("model",)
    encoded = iter(SegmentEncoder(tokenizer).encode_records(text_records, trained))
    vocab = len(tokenizer)
    for where, rec in records:
        if rec.tokenized:
            prompt = list(rec.prompt_ids or [])
            output = list(rec.output_ids or [])
            mask = list(rec.loss_mask or [])
            if max(prompt + output, default=0) >= vocab:
                raise ILDataError(f"{where}: token id beyond the tokenizer's vocabulary ({vocab})")
            if loss_scope == "trajectory":
                mask = [1] * len(output)
        else:
            prompt, output, mask = next(encoded)
        if not prompt:
            raise ILDataError(f"{where}: empty prompt and the tokenizer has no BOS token to condition on")
        if len(prompt) + len(output) > max_length:
            data.drop("too_long")
            continue
        if not any(mask):
            data.drop("no_target")
            continue
        data.examples.append(ILExample(role, prompt, output, mask, where))

    for reason, n in data.dropped.items():
        log.warning("%s: dropped %d of %d records (%s)", file, n, data.records, reason)
    if not data.examples:
        raise ILDataError(
            f"{file}: no usable examples out of {data.records} records (dropped: {data.dropped})"
        )
    return data


def fingerprint(examples: Sequence[ILExample]) -> str:
    """A hash of the examples' ids and masks; a resumed run checks it saw the same data."""
    h = hashlib.sha256()
    for e in examples:
        h.update(repr((e.role, e.prompt_ids, e.output_ids, e.target_mask)).encode())
    return h.hexdigest()[:16]


class TokenPair(Protocol):
    """Anything with prompt and output ids (IL examples, RL samples) can be batched by length."""

    @property
    def prompt_ids(self) -> Sequence[int]: ...

    @property
    def output_ids(self) -> Sequence[int]: ...


def padded_size(examples: Sequence[TokenPair]) -> int:
    """Tokens of the batch ``collate`` builds: left-padded prompts plus right-padded outputs."""
    width = max(len(e.prompt_ids) for e in examples) + max(len(e.output_ids) for e in examples)
    return len(examples) * width


def length_batches(
    examples: Sequence[TokenPair],
    *,
    batch_size: int,
    max_batch_tokens: int | None,
    pool: int,
    rng: random.Random,
) -> list[list[int]]:
    """Index batches of examples that pad well together, in random order.

    ``collate`` left-pads prompts and right-pads outputs, so a batch costs ``n * (max prompt +
    max output)``; prompt and output lengths vary independently (memory grows the prompt,
    episode length the output), so sorting by one length leaves much padding. Instead the
    examples are shuffled and cut into pools of ``pool``; within a pool each batch starts from the
    longest example left and greedily adds the one that grows the padded size least, up to
    ``batch_size`` examples and (when set) ``max_batch_tokens`` padded tokens. An example alone
    over the budget gets a batch of its own.
    """
    order = list(range(len(examples)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        idx = np.array(order[start : start + pool])
        p_len = np.array([len(examples[i].prompt_ids) for i in idx])
        o_len = np.array([len(examples[i].output_ids) for i in idx])
        left = np.ones(len(idx), dtype=bool)
        while left.any():
            # Ties go to the earlier position in the shuffled pool, so batches vary across epochs.
            first = int(np.argmax(np.where(left, p_len + o_len, -1)))
            left[first] = False
            batch, width_p, width_o = [first], p_len[first], o_len[first]
            while len(batch) < batch_size and left.any():
                size = (len(batch) + 1) * (np.maximum(width_p, p_len) + np.maximum(width_o, o_len))
                if max_batch_tokens is not None:
                    left_fit = left & (size <= max_batch_tokens)
                    if not left_fit.any():
                        break
                else:
                    left_fit = left
                pick = int(np.argmin(np.where(left_fit, size - p_len - o_len, np.iinfo(np.int64).max)))
                left[pick] = False
                batch.append(pick)
                width_p, width_o = max(width_p, p_len[pick]), max(width_o, o_len[pick])
            batches.append([int(idx[j]) for j in batch])
    rng.shuffle(batches)
    return batches


@dataclass
class ILBatch:
    tokens: TokenBatch
    loss_mask: torch.Tensor
    """[B, T] float, 1 on output tokens that count in the loss."""
    n_target: int
    n_tokens: int
    """Real (unpadded) prompt + output tokens."""


def collate_examples(examples: Sequence[ILExample], pad_id: int) -> ILBatch:
    tokens = collate([e.prompt_ids for e in examples], [e.output_ids for e in examples], pad_id)
    mask = torch.zeros(tokens.targets.shape, dtype=torch.float32)
    for row, e in enumerate(examples):
        mask[row, : len(e.target_mask)] = torch.tensor(e.target_mask, dtype=torch.float32)
    return ILBatch(tokens, mask, sum(e.n_target for e in examples), sum(e.n_tokens for e in examples))
