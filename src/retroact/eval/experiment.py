"""``retroact experiment``: the paper's comparison (SPEC §4) on one env and model, over seeds.

Every stage writes into ``OUT/seed<S>/<stage>-<hash>`` where the hash covers the stage's settings,
so methods that share a stage (SFT, IL, SFT+RL and RetroAct all start from one IL checkpoint)
run it once, and a re-run reuses every finished stage (each stage also resumes on its own).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.console import Console

from retroact.agent.loop import LoopConfig
from retroact.agent.records import read_records, write_records
from retroact.data.collect import collect
from retroact.eval.evaluate import evaluate
from retroact.models.pretrained import SMOLLM2
from retroact.models.tiny import TinyModelConfig
from retroact.train.common import METRICS_FILE
from retroact.train.il import ILConfig, train_il
from retroact.train.rl import RLConfig, learning_curve, train_rl

MethodKind = Literal["expert", "react", "reflexion", "sft", "il", "ei", "rl"]


class MethodSpec(BaseModel):
    """One row of the results table."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: MethodKind = Field(description="How the agent is obtained (see docs/experiments.md).")
    reflect: bool = Field(True, description="Evaluate with the reflector between trials.")
    il: dict[str, Any] = Field(default_factory=dict, description="ILConfig overrides for this method.")
    rl: dict[str, Any] = Field(default_factory=dict, description="RLConfig overrides (kind `rl`).")


BUILTIN_METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in [
        MethodSpec(name="Expert", kind="expert"),
        MethodSpec(name="ReAct", kind="react", reflect=False),
        MethodSpec(name="Reflexion", kind="reflexion"),
        MethodSpec(name="SFT", kind="sft", reflect=False),
        MethodSpec(name="IL", kind="il"),
        MethodSpec(name="SFT+EI", kind="ei", reflect=False),
        MethodSpec(name="SFT+RL", kind="rl", reflect=False, rl={"optimise": "planner", "trials": 1}),
        MethodSpec(name="RetroAct", kind="rl"),
        MethodSpec(name="RetroAct (shared model)", kind="rl", il={"shared": True}),
        MethodSpec(name="RetroAct (planner only)", kind="rl", rl={"optimise": "planner"}),
        MethodSpec(name="RetroAct (reflector only)", kind="rl", rl={"optimise": "reflector"}),
        MethodSpec(name="RetroAct (λ=0)", kind="rl", rl={"lam": 0.0}),
        MethodSpec(name="RetroAct (λ=2)", kind="rl", rl={"lam": 2.0}),
        MethodSpec(name="RetroAct (ppo_clip)", kind="rl", rl={"objective": "ppo_clip"}),
        MethodSpec(name="RetroAct (on-policy)", kind="rl", rl={"mode": "on_policy"}),
    ]
}


class CollectSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: int = Field(300, ge=1, description="Train tasks the expert runs on.")
    trials: int = Field(3, ge=1)
    expert: str = Field("expert", description="`expert` (scripted), `openai:MODEL` or a model path.")
    mistakes: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Scripted household expert: probability of a deliberate mistake at a step that has "
        "one; IL trains on the recovery, never on the mistake (`collect --mistakes`, docs/il.md).",
    )

    @model_validator(mode="after")
    def _mistakes_need_scripted(self) -> CollectSettings:
        if self.mistakes and self.expert != "expert":
            raise ValueError("mistakes: only the scripted expert (`expert: expert`) makes mistakes")
        return self


class EvalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    split: str = "test"
    tasks: int | None = Field(50, ge=1, description="Test tasks (null: the whole split).")
    trials: int = Field(5, ge=1, description="Trials per task (paper: 10).")
    max_steps: int | None = Field(None, ge=1, description="Steps per trial; null: the env's default.")
    batch_size: int = Field(32, ge=1)


class ExperimentConfig(BaseModel):
    """An experiment: one env and model, stage settings shared by all methods, methods, seeds."""

    model_config = ConfigDict(extra="forbid")

    env: str = "household"
    env_options: dict[str, Any] = Field(default_factory=dict)
    model: str = Field(
        "tiny",
        description=f"`tiny` (built by init-model into the stages directory, by default "
        f"OUT/model-<key>), `{SMOLLM2}` (converted once into the cache, see docs/models.md) or a model path.",
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    collect: CollectSettings = Field(default_factory=CollectSettings)
    il: dict[str, Any] = Field(default_factory=dict, description="ILConfig fields for every IL run.")
    rl: dict[str, Any] = Field(default_factory=dict, description="RLConfig fields for every RL run.")
    eval: EvalSettings = Field(default_factory=EvalSettings)
    methods: list[str | MethodSpec] = Field(
        default_factory=lambda: ["Expert", "SFT", "IL", "SFT+RL", "RetroAct"],
        description="Built-in method names (see BUILTIN_METHODS) or full method specs.",
    )

    def method_specs(self) -> list[MethodSpec]:
        out = []
        for m in self.methods:
            if isinstance(m, str):
                if m not in BUILTIN_METHODS:
                    raise ValueError(f"methods: unknown method {m!r}; built-in: {', '.join(BUILTIN_METHODS)}")
                m = BUILTIN_METHODS[m]
            out.append(m)
        return out


def _key(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _key_settings(cfg: BaseModel, added: set[str]) -> dict[str, Any]:
    """``cfg``'s settings for a stage key, without the ``added`` ones (settings that came after stages
    were first cached) while they keep their defaults: the key is then the one it had before they
    existed, and earlier runs stay cached."""
    defaults = {name for name in added if getattr(cfg, name) == type(cfg).model_fields[name].default}
    return cfg.model_dump(exclude=defaults)


class Experiment:
    """Runs the stages a method needs, once per seed, reusing what is already on disk."""

    def __init__(
        self, cfg: ExperimentConfig, out: Path, console: Console | None = None, stages: Path | None = None
    ) -> None:
        """``out`` gets results.json; ``stages`` (default ``out``) holds the model, data, checkpoints,
        RL runs and evaluations. Their paths are keyed by every setting they depend on, so experiments
        can share one stages directory (e.g. another config's runs on the demo's IL checkpoint)."""
        self.cfg, self.out, self.console = cfg, out, console or Console()
        self.stages = stages or out
        self.stage_no = 0

    def _stage(self, title: str) -> None:
        self.stage_no += 1
        self.console.rule(f"[bold]stage {self.stage_no}: {title}")

    def seed_dir(self, seed: int) -> Path:
        return self.stages / f"seed{seed}"

    def model_inputs(self) -> dict[str, Any]:
        c = self.cfg
        return {"model": c.model, "tiny": c.tiny.model_dump() if c.model == "tiny" else None}

    def tiny_model_path(self) -> Path:
        return self.stages / f"model-{_key(self.model_inputs())}"

    # -- shared stages
    def model_path(self) -> str:
        if self.cfg.model == SMOLLM2:
            from retroact.models.pretrained import init_pretrained, smollm2_dir

            path = smollm2_dir()
            if not (path / "config.json").exists():
                self._stage(f"init-model --from {SMOLLM2} -> {path}")
                init_pretrained(SMOLLM2, path)
            return str(path)
        if self.cfg.model != "tiny":
            return self.cfg.model
        path = self.tiny_model_path()
        if not (path / "config.json").exists():
            from retroact.models.corpus import available_builtin_envs, env_corpus
            from retroact.models.tiny import build_tiny_model

            self._stage("init-model (tokenizer + tiny Llama)")
            build_tiny_model(path, list(env_corpus(available_builtin_envs())), self.cfg.tiny)
        return str(path)

    # Paths are pure functions of the settings; the methods without ``_path`` also make them. Keys name
    # an earlier stage by its directory name, not its path, so a stages directory can be moved.
    def data_path(self, seed: int) -> Path:
        c = self.cfg.collect
        settings = _key_settings(c, {"mistakes"})
        return self.seed_dir(seed) / f"data-{_key([self.cfg.env, self.cfg.env_options, settings])}"

    def data_dir(self, seed: int) -> Path:
        path = self.data_path(seed)
        if not (path / "stats.json").exists():
            from retroact.models import load_policies

            c = self.cfg.collect
            self._stage(f"collect expert data ({c.tasks} train tasks, {c.trials} trials)")
            options = {"mistakes": c.mistakes, "seed": seed} if c.mistakes else None
            planner, reflector = load_policies(self.cfg.env, c.expert, c.expert, expert_options=options)
            loop = LoopConfig(
                trials=c.trials, seed=seed, env_options=self.cfg.env_options, fewshot=c.expert != "expert"
            )
            stats = collect(
                self.cfg.env, planner, reflector, path, n_tasks=c.tasks, task_seed=seed, config=loop
            )
            self.console.print(f"kept {stats['kept']}, trial-1 success {stats['trial1_success']:.1%}")
        return path

    def il_config(self, seed: int, overrides: dict[str, Any]) -> ILConfig:
        return ILConfig.model_validate({**self.cfg.il, **overrides, "seed": seed})

    def il_path(self, seed: int, overrides: dict[str, Any], data: Path) -> Path:
        inputs = [data.name, self.model_inputs(), self.il_config(seed, overrides).model_dump()]
        return self.seed_dir(seed) / f"il-{_key(inputs)}"

    def il_ckpt(self, seed: int, overrides: dict[str, Any], data: Path | None = None) -> Path:
        data = data or self.data_dir(seed)
        path = self.il_path(seed, overrides, data)
        if not _il_done(path):
            il_cfg = self.il_config(seed, overrides)
            model = self.model_path()  # its own stage when the tiny model is still to be built
            self._stage(f"imitation learning ({il_cfg.finetune}, {il_cfg.epochs} epochs) -> {path.name}")
            train_il(data, model, path, il_cfg)
        return path

    def rl_config(self, seed: int, method: MethodSpec) -> RLConfig:
        env = {"seed": seed, "env": self.cfg.env, "env_options": self.cfg.env_options}
        return RLConfig.model_validate({**self.cfg.rl, **method.rl, **env})

    def rl_path(self, seed: int, method: MethodSpec) -> Path:
        init = self.il_path(seed, method.il, self.data_path(seed))
        settings = _key_settings(self.rl_config(seed, method), {"warmup_steps"})
        return self.seed_dir(seed) / f"rl-{_key([init.name, settings])}"

    def rl_run(self, seed: int, method: MethodSpec) -> Path:
        rl_cfg = self.rl_config(seed, method)
        path = self.rl_path(seed, method)
        state = path / "latest" / "state.json"
        if not (state.exists() and json.loads(state.read_text())["iteration"] >= rl_cfg.iterations):
            init = self.il_ckpt(seed, method.il)
            self._stage(f"RL for {method.name} ({rl_cfg.iterations} iterations, optimise {rl_cfg.optimise})")
            train_rl(init, self.data_dir(seed), path, rl_cfg, console=self.console)
        return path

    def ei_ckpt(self, seed: int, method: MethodSpec) -> Path:
        """Expert iteration: the SFT agent's own successful train trials join the expert data, IL again."""
        from retroact.models.hf import HFPolicy

        sft = self.il_ckpt(seed, method.il)
        data = self.data_dir(seed)
        own = self.seed_dir(seed) / f"ei-rollouts-{_key([sft.name])}"
        if not (own / "stats.json").exists():
            self._stage("expert iteration: roll out the SFT agent on train tasks")
            policy = HFPolicy.load(sft)
            collect(
                self.cfg.env,
                policy,
                None,
                own,
                n_tasks=self.cfg.collect.tasks,
                task_seed=seed + 1,
                config=LoopConfig(trials=1, seed=seed, env_options=self.cfg.env_options),
            )
        merged = self.seed_dir(seed) / f"ei-data-{_key([data.name, own.name])}"
        if not (merged / "reflector.jsonl").exists():
            write_records(
                merged / "planner.jsonl",
                read_records(data / "planner.jsonl") + read_records(own / "planner.jsonl"),
            )
            write_records(merged / "reflector.jsonl", read_records(data / "reflector.jsonl"))
        return self.il_ckpt(seed, method.il, data=merged)

    # -- one method, one seed
    def eval_inputs(self, method: MethodSpec) -> dict[str, Any]:
        """Every setting an evaluation's result depends on: a change in any of them re-runs it."""
        c = self.cfg
        inputs: dict[str, Any] = {
            "method": method.model_dump(),
            "env": c.env,
            "env_options": c.env_options,
            "eval": c.eval.model_dump(),
        }
        if method.kind != "expert":
            inputs |= self.model_inputs()
        if method.kind not in ("expert", "react", "reflexion"):
            inputs |= {"collect": c.collect.model_dump(), "il": c.il}
        if method.kind == "rl":
            inputs["rl"] = c.rl
        return inputs

    def evaluate(self, seed: int, method: MethodSpec) -> dict[str, Any]:
        from retroact.models import load_policies
        from retroact.models.hf import HFPolicy

        e = self.cfg.eval
        path = self.seed_dir(seed) / "eval" / f"{_slug(method.name)}-{_key(self.eval_inputs(method))}"
        if (path / "results.json").exists():
            return json.loads((path / "results.json").read_text())
        kind = method.kind
        if kind == "expert":
            planner, reflector = load_policies(self.cfg.env, "expert", "expert")
        elif kind in ("react", "reflexion"):
            planner, reflector = load_policies(self.cfg.env, self.model_path(), self.model_path())
        else:
            ckpt = {
                "sft": lambda: self.il_ckpt(seed, method.il),
                "il": lambda: self.il_ckpt(seed, method.il),
                "ei": lambda: self.ei_ckpt(seed, method),
                "rl": lambda: self.rl_run(seed, method) / "latest" / "ckpt",
            }[kind]()
            planner = reflector = HFPolicy.load(ckpt)
        self._stage(
            f"evaluate {method.name} ({e.tasks or 'all'} {e.split} tasks, {e.trials} trials, seed {seed})"
        )
        loop = LoopConfig(
            trials=e.trials,
            max_steps=e.max_steps,
            seed=seed,
            batch_size=e.batch_size,
            reflect=method.reflect,
            fewshot=kind in ("react", "reflexion"),
            env_options=self.cfg.env_options,
        )
        return evaluate(
            self.cfg.env,
            planner,
            reflector if method.reflect else None,
            split=e.split,
            n_tasks=e.tasks,
            config=loop,
            out_dir=path,
        )

    def run(self) -> dict[str, Any]:
        """Every method over every seed; returns the aggregated results (also OUT/results.json)."""
        start = time.perf_counter()
        per_method: dict[str, list[dict[str, Any]]] = {}
        for seed in self.cfg.seeds:
            for method in self.cfg.method_specs():
                per_method.setdefault(method.name, []).append(self.evaluate(seed, method))
        results = {
            "env": self.cfg.env,
            "model": self.cfg.model,
            "split": self.cfg.eval.split,
            "n_tasks": next(iter(per_method.values()))[0]["n_tasks"] if per_method else 0,
            "trials": self.cfg.eval.trials,
            "methods": {name: aggregate(runs) for name, runs in per_method.items()},
            "learning_curves": self.learning_curves(),
            "seconds": round(time.perf_counter() - start, 1),
        }
        (self.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        return results

    def learning_curves(self) -> dict[str, list[dict[str, Any]]]:
        """Train reward per RL iteration against rollout episodes, per RL run of the first seed."""
        curves: dict[str, list[dict[str, Any]]] = {}
        seed = self.cfg.seeds[0]
        for method in self.cfg.method_specs():
            if method.kind != "rl":
                continue
            run = self.rl_path(seed, method)
            if (run / METRICS_FILE).exists():
                curves[method.name] = learning_curve(run)
        return curves


def _il_done(path: Path) -> bool:
    metrics = path / METRICS_FILE
    return metrics.exists() and any('"event": "done"' in line for line in metrics.read_text().splitlines())


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean (and std over seeds) of IR/FR/AR and of the per-trial reward and success."""

    def mean_std(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    out: dict[str, Any] = {"seeds": len(runs)}
    for key in ("IR", "FR", "AR"):
        out[key], out[f"{key}_std"] = mean_std([r[key] for r in runs])
    for key in ("per_trial_reward", "per_trial_success"):
        out[key] = [statistics.fmean(col) for col in zip(*(r[key] for r in runs), strict=True)]
    out["IR_success"] = out["per_trial_success"][0]
    out["FR_success"] = out["per_trial_success"][-1]
    return out
