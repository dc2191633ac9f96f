"""Policy backends and how a CLI string names one: ``expert``, ``none``, ``openai:MODEL`` or a path."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from retroact.models.base import Policy


def load_policies(
    env: str,
    planner: str,
    reflector: str,
    *,
    api_options: Mapping[str, Any] | None = None,
    expert_options: Mapping[str, Any] | None = None,
) -> tuple[Policy, Policy | None]:
    """Resolve ``--planner`` / ``--reflector`` strings; one name given twice loads one policy.

    ``api_options`` are extra :class:`~retroact.models.openai_policy.OpenAIPolicy` arguments for
    ``openai:MODEL`` (e.g. ``cache``, ``max_requests``, ``strict``); ``expert_options`` are the
    env's ``experts(**options)`` for ``expert`` (e.g. household's ``mistakes``). Paths and hub
    names load as :class:`~retroact.models.hf.HFPolicy` in the prompt format stored with their tokenizer.
    """

    experts: tuple[Policy, Policy] | None = None
    loaded: dict[str, Policy] = {}

    def resolve(name: str, role: str) -> Policy | None:
        nonlocal experts
        if name == "none":
            if role == "planner":
                raise ValueError("--planner cannot be 'none'")
            return None
        if name == "expert":
            experts = experts or _experts(env, expert_options or {})
            return experts[0] if role == "planner" else experts[1]
        if name not in loaded:
            if name.startswith("openai:"):
                from retroact.models.openai_policy import OpenAIPolicy

                loaded[name] = OpenAIPolicy(model=name.removeprefix("openai:"), **dict(api_options or {}))
            else:
                from retroact.models.hf import HFPolicy

                loaded[name] = HFPolicy.load(name)
        return loaded[name]

    planner_policy = resolve(planner, "planner")
    assert planner_policy is not None
    return planner_policy, resolve(reflector, "reflector")


def _experts(env: str, options: Mapping[str, Any]) -> tuple[Policy, Policy]:
    from retroact.envs import get_spec

    try:
        return get_spec(env).experts(**options)
    except TypeError as err:  # an option this env's expert does not have
        raise ValueError(f"the {env} expert does not take the options {dict(options)}: {err}") from None
