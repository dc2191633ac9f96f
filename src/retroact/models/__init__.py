"""Policy backends and how a CLI string names one: ``expert``, ``none``, ``openai:MODEL`` or a path."""

from __future__ import annotations

from retroact.models.base import Policy


def load_policies(env: str, planner: str, reflector: str) -> tuple[Policy, Policy | None]:
    """Resolve ``--planner`` / ``--reflector`` strings; one path named twice loads one model."""
    from retroact.envs import get_spec

    experts: tuple[Policy, Policy] | None = None
    loaded: dict[str, Policy] = {}

    def resolve(name: str, role: str) -> Policy | None:
        nonlocal experts
        if name == "none":
            if role == "planner":
                raise ValueError("--planner cannot be 'none'")
            return None
        if name == "expert":
            experts = experts or get_spec(env).experts()
            return experts[0] if role == "planner" else experts[1]
        if name not in loaded:
            if name.startswith("openai:"):
                from retroact.models.openai_policy import OpenAIPolicy

                loaded[name] = OpenAIPolicy(model=name.removeprefix("openai:"))
            else:
                from retroact.models.hf import HFPolicy

                loaded[name] = HFPolicy.load(name)
        return loaded[name]

    planner_policy = resolve(planner, "planner")
    assert planner_policy is not None
    return planner_policy, resolve(reflector, "reflector")
