"""The policy interface: what the agent loop asks of a model and what it gets back.

A context is a list of :class:`Segment` s. Prompt and env segments are tokenised once, when the
loop creates them, by the policy that will read them; model segments carry the token ids and
behaviour log-probs exactly as sampled. A policy's input ids are the concatenation of its
segments' ids, so a loss later sees the very tokens the model saw (no re-tokenisation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from retroact.envs.base import Task

Role = Literal["planner", "reflector"]
ROLES: tuple[Role, ...] = ("planner", "reflector")
SegmentKind = Literal["prompt", "model", "env", "mistake"]
"""``mistake``: a wrong line a scripted expert wrote on purpose in the model's place (collection
noise, see data/collect.py). A student reads it as its own line but is never trained to write it."""
WRITTEN: tuple[SegmentKind, ...] = ("model", "mistake")
"""Kinds written in the model's place (formatted as the model's text, e.g. in an assistant turn)."""


@dataclass
class Segment:
    kind: SegmentKind
    text: str
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    """Behaviour log-probs of sampled tokens (model segments of tokenised policies only)."""


@dataclass(frozen=True)
class PlannerView:
    """What the planner sees, structured for scripted experts.

    ``task`` is there for oracle experts that are allowed privileged data (e.g. HotpotQA's
    supporting facts); honest experts (household) use only the observations and memory.
    """

    task: Task
    first_observation: str
    memory: tuple[str, ...]
    history: tuple[tuple[str, str], ...]
    """(action line, observation) pairs so far."""
    trial: int


@dataclass(frozen=True)
class ReflectorView:
    task: Task
    first_observation: str
    memory: tuple[str, ...]
    history: tuple[tuple[str, str], ...]
    reward: float
    trial: int


@dataclass
class GenRequest:
    role: Role
    segments: list[Segment]
    view: PlannerView | ReflectorView

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)

    @property
    def token_ids(self) -> list[int]:
        ids: list[int] = []
        for s in self.segments:
            if s.token_ids is None:
                raise ValueError("segment was not tokenised; call Policy.encode when creating it")
            ids.extend(s.token_ids)
        return ids


@dataclass
class Generation:
    text: str
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    """Log-prob of each sampled token under the sampling distribution, recorded at sampling time."""
    mistake: bool = False
    """A wrong line written on purpose (see ``SegmentKind``); the loop records it as a ``mistake``."""
    finish_reason: Literal["stop", "length", "eos", "context", "error"] = "stop"
    """``context``: the request (plus ``max_new_tokens``) does not fit the model; nothing was sampled."""
    error: str | None = None

    @classmethod
    def failed(cls, err: ValueError) -> Generation:
        """What a request that cannot run gets: ``context`` for :class:`ContextFull`, else ``error``."""
        reason: Literal["context", "error"] = "context" if isinstance(err, ContextFull) else "error"
        return cls(text="", token_ids=[], logprobs=[], finish_reason=reason, error=str(err))


class ContextFull(ValueError):
    """A request's tokens plus ``max_new_tokens`` exceed the model's positions."""


def checked_context(ids: list[int], max_new_tokens: int, limit: int | None, owner: str) -> list[int]:
    """``ids`` if a request with them can run on ``owner`` (``limit`` positions, None: unbounded)."""
    if not ids:
        raise ValueError("empty context: a request needs at least one token")
    if limit is not None and len(ids) + max_new_tokens > limit:
        raise ContextFull(
            f"context of {len(ids)} tokens + max_new_tokens {max_new_tokens} "
            f"exceeds the {owner}'s {limit} positions"
        )
    return ids


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    """0 is greedy; then the recorded log-probs are those of the untempered model (T = 1)."""
    top_p: float = 1.0
    max_new_tokens: int = 48
    stop: tuple[str, ...] = ("\n",)
    seed: int = 0


@dataclass
class PolicyInfo:
    name: str
    version: int = 0
    """Adapter version: bumped by every RL iteration that updates the adapters."""
    extra: dict[str, object] = field(default_factory=dict)


class Policy(Protocol):
    """A planner/reflector backend: an HF model with adapters, an API model, or a scripted expert."""

    info: PolicyInfo

    @property
    def tokenized(self) -> bool:
        """Whether this policy works in token space (then ``encode`` returns ids)."""
        ...

    def encode(self, text: str, kind: SegmentKind) -> list[int] | None:
        """Token ids of a segment's text as this policy reads it; None for text-only policies.

        ``prompt`` opens a context (BOS, or a chat template's conversation head), ``env`` follows
        a model segment, ``model`` is text as the model would write it (see models/chat.py).
        """
        ...

    def generate(self, requests: Sequence[GenRequest], sampling: SamplingParams) -> list[Generation]:
        """One generation per request, all requests of one role, batched where the backend can."""
        ...
