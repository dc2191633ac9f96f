"""Planner and reflector prompts: instruction, memory block, task, scratchpad (SPEC §1).

The wording per env lives in its :class:`~retroact.envs.base.PromptStyle`; this module only puts
the pieces together, identically for every env, so students and experts see one structure.
"""

from __future__ import annotations

from collections.abc import Sequence

from retroact.envs.base import PromptStyle


def memory_block(memory: Sequence[str], header: str) -> str:
    if not memory:
        return ""
    return header + "".join(f"- {m}\n" for m in memory)


def planner_prompt(
    style: PromptStyle, memory: Sequence[str], first_observation: str, *, fewshot: bool
) -> str:
    """The planner's s_0: everything before its first action, ending with the step prefix."""
    parts = [style.planner_instruction.strip() + "\n"]
    if fewshot and style.fewshot:
        parts.append(style.fewshot.strip() + "\n")
    parts.append(memory_block(memory, "Your reflections from earlier trials:\n"))
    parts.append(observation_text(first_observation) + style.step_prefix)
    return "".join(parts)


def observation_text(observation: str) -> str:
    """Env text as it enters the scratchpad: exactly one trailing newline."""
    return observation.rstrip("\n") + "\n"


def scratchpad(style: PromptStyle, first_observation: str, history: Sequence[tuple[str, str]]) -> str:
    steps = "".join(f"{style.step_prefix}{a}\n{observation_text(o)}" for a, o in history)
    return observation_text(first_observation) + steps


def reflector_prompt(
    style: PromptStyle,
    memory: Sequence[str],
    first_observation: str,
    history: Sequence[tuple[str, str]],
    *,
    fewshot: bool,
) -> str:
    """The reflector's input: the failed trial τ_k (and earlier reflections where the env wants them)."""
    parts = [style.reflector_instruction.strip() + "\n"]
    if fewshot and style.reflector_fewshot:
        parts.append(style.reflector_fewshot.strip() + "\n")
    parts.append(memory_block(memory, "Earlier reflections:\n"))
    parts.append("Failed trial:\n" + scratchpad(style, first_observation, history))
    parts.append("Reflection:")
    return "".join(parts)
