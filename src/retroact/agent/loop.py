"""The batched multi-trial loop: planner episode -> evaluator -> reflector -> memory (SPEC §1).

All active episodes advance in lock-step: one batched planner call per step, one batched
reflector call per reflection round. Contexts are built in token space as the model sees them
(prompt segment, then model and env segments), so records carry exact ids, masks and
behaviour log-probs. A failing episode (bad output, env error, timeout) is recorded and ends;
the others go on. A trial whose context outgrows the model ends as a plain failed trial.
"""

from __future__ import annotations

import concurrent.futures as cf
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from retroact.agent import prompts
from retroact.agent.records import OutputSegment, TrajectoryRecord, flatten_output
from retroact.envs import EnvSpec, StepResult, Task, TextEnv, clean_action, get_spec
from retroact.models.base import (
    Generation,
    GenRequest,
    PlannerView,
    Policy,
    ReflectorView,
    Role,
    SamplingParams,
    Segment,
    SegmentKind,
)


class LoopConfig(BaseModel):
    """Settings of one multi-trial run."""

    model_config = ConfigDict(extra="forbid")

    trials: int = Field(3, ge=1, description="Trials per task (SPEC: 10 at test).")
    max_steps: int | None = Field(None, ge=1, description="Steps per trial; None = the env's default.")
    temperature: float = Field(0.0, ge=0, description="Planner and reflector sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1)
    reflect: bool = Field(True, description="False runs ReAct without reflections between trials.")
    fewshot: bool = Field(False, description="Add the env's exemplars to prompts (LLM experts only).")
    batch_size: int = Field(32, ge=1, description="Most episodes per generation call.")
    step_timeout: float = Field(30.0, gt=0, description="Seconds an env reset/step may take.")
    seed: int = 0
    env_options: dict[str, object] = Field(default_factory=dict, description="Passed to the env's make().")


@dataclass
class LoopResult:
    task_ids: list[str]
    rewards: list[list[float]]
    """[task][trial] reward, a solved task's reward carried into later trials."""
    successes: list[list[bool]]
    records: list[TrajectoryRecord]
    n_errors: int = 0
    n_actions: int = 0
    n_valid_actions: int = 0
    n_repeat_stops: int = 0

    @property
    def per_trial_reward(self) -> list[float]:
        return _column_means(self.rewards)

    @property
    def per_trial_success(self) -> list[float]:
        return _column_means([[float(s) for s in row] for row in self.successes])


def _column_means(rows: list[list[float]]) -> list[float]:
    if not rows:
        return []
    return [sum(col) / len(rows) for col in zip(*rows, strict=True)]


@dataclass
class _Episode:
    task: Task
    env: TextEnv
    trial: int
    memory: tuple[str, ...]
    first_obs: str = ""
    segments: list[Segment] = field(default_factory=list)
    history: list[tuple[str, str]] = field(default_factory=list)
    last: StepResult | None = None
    last_action: str | None = None
    done: bool = False
    error: str | None = None
    n_valid: int = 0
    repeat_stop: bool = False
    context_full: bool = False
    """The next request no longer fit the model: the trial ended there, as a failure to reflect on."""

    @property
    def reward(self) -> float:
        return 0.0 if self.error or self.last is None else float(self.last.reward)

    @property
    def success(self) -> bool:
        return bool(self.done and not self.error and self.last and self.last.info.get("success", False))


class _Runner:
    def __init__(
        self,
        spec: EnvSpec,
        planner: Policy,
        reflector: Policy | None,
        config: LoopConfig,
        on_episode: Callable[[], None] | None,
    ) -> None:
        self.spec, self.planner, self.reflector, self.cfg = spec, planner, reflector, config
        self.max_steps = config.max_steps or spec.max_steps
        self.on_episode = on_episode
        self.pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="env")
        self.records: list[TrajectoryRecord] = []
        self.stats = {"errors": 0, "actions": 0, "valid": 0, "repeats": 0}

    # -- env calls with a timeout: a hung env fails its episode, never the run.
    def _call(self, fn: Callable[..., object], *args: object) -> object:
        future = self.pool.submit(fn, *args)
        try:
            return future.result(timeout=self.cfg.step_timeout)
        except cf.TimeoutError:
            # The stuck thread is abandoned with its env; a fresh worker serves the others.
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="env")
            raise TimeoutError(f"env call took longer than {self.cfg.step_timeout:g}s") from None

    def _sampling(self, role: Role, trial: int, step: int, chunk: int) -> SamplingParams:
        style = self.spec.prompts
        key = f"{self.cfg.seed}/{role}/{trial}/{step}/{chunk}".encode()
        return SamplingParams(
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            max_new_tokens=style.max_action_tokens if role == "planner" else style.max_reflection_tokens,
            stop=("\n",),
            seed=zlib.crc32(key),
        )

    def _generate(
        self, policy: Policy, role: Role, requests: list[GenRequest], trial: int, step: int
    ) -> list[Generation]:
        """Batched generation in chunks of similar length (less padding)."""
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].text))
        out: list[Generation | None] = [None] * len(requests)
        bs = self.cfg.batch_size
        for c, start in enumerate(range(0, len(order), bs)):
            idx = order[start : start + bs]
            gens = policy.generate([requests[i] for i in idx], self._sampling(role, trial, step, c))
            for i, g in zip(idx, gens, strict=True):
                out[i] = g
        return [g for g in out if g is not None]

    def _segment(self, policy: Policy, kind: SegmentKind, text: str) -> Segment:
        return Segment(kind, text, policy.encode(text, kind))

    # -- one trial of every given task, in lock-step
    def run_trial(self, episodes: list[_Episode]) -> None:
        for ep in episodes:
            try:
                ep.first_obs = str(self._call(ep.env.reset, ep.task))
            except Exception as err:  # noqa: BLE001 - recorded, the run goes on
                self._fail(ep, f"reset failed: {type(err).__name__}: {err}")
                continue
            text = prompts.planner_prompt(
                self.spec.prompts, ep.memory, ep.first_obs, fewshot=self.cfg.fewshot
            )
            ep.segments = [self._segment(self.planner, "prompt", text)]
        for step in range(self.max_steps):
            active = [ep for ep in episodes if not ep.done]
            if not active:
                break
            requests = [
                GenRequest(
                    "planner",
                    ep.segments,
                    PlannerView(ep.task, ep.first_obs, ep.memory, tuple(ep.history), ep.trial),
                )
                for ep in active
            ]
            for ep, gen in zip(
                active, self._generate(self.planner, "planner", requests, active[0].trial, step), strict=True
            ):
                self._advance(ep, gen, final_step=step == self.max_steps - 1)
        for ep in episodes:
            ep.done = True
            self.records.append(self._planner_record(ep))
            if self.on_episode:
                self.on_episode()

    def _advance(self, ep: _Episode, gen: Generation, *, final_step: bool) -> None:
        if gen.finish_reason == "error":
            self._fail(ep, f"generation failed: {gen.error}")
            return
        if gen.finish_reason == "context":
            ep.done = ep.context_full = True
            return
        kind: SegmentKind = "mistake" if gen.mistake else "model"
        ep.segments.append(Segment(kind, gen.text, gen.token_ids, gen.logprobs))
        action = clean_action(gen.text)
        self.stats["actions"] += 1
        if action and action == ep.last_action:
            self.stats["repeats"] += 1
            ep.done = ep.repeat_stop = True
            return
        ep.last_action = action
        try:
            result = self._call(ep.env.step, action)
            assert isinstance(result, StepResult), f"env.step returned {type(result).__name__}"
        except Exception as err:  # noqa: BLE001
            self._fail(ep, f"env step failed: {type(err).__name__}: {err}")
            return
        ep.n_valid += int(result.info.get("valid", True))
        self.stats["valid"] += int(result.info.get("valid", True))
        ep.last = result
        ep.history.append((action, result.observation))
        ep.done = result.done or final_step
        obs = prompts.observation_text(result.observation)
        ep.segments.append(
            self._segment(self.planner, "env", obs if ep.done else obs + self.spec.prompts.step_prefix)
        )

    def _fail(self, ep: _Episode, error: str) -> None:
        ep.error, ep.done = error, True
        self.stats["errors"] += 1

    def _planner_record(self, ep: _Episode) -> TrajectoryRecord:
        prompt, *out = ep.segments or [Segment("prompt", "")]
        info = {
            "memory": list(ep.memory),
            "first_observation": ep.first_obs,
            "valid_actions": ep.n_valid,
            "repeat_stop": ep.repeat_stop,
            "context_full": ep.context_full,
        }
        return self._record(
            "planner",
            self.planner,
            ep,
            prompt,
            out,
            success=ep.success,
            n_steps=len(ep.history),
            error=ep.error,
            info=info,
        )

    def _record(
        self, role: Role, policy: Policy, ep: _Episode, prompt: Segment, out: list[Segment], **fields: object
    ) -> TrajectoryRecord:
        """A record of ``out`` after ``prompt``; token fields when the policy worked in token space."""
        if policy.tokenized and prompt.token_ids is not None and all(s.token_ids is not None for s in out):
            ids, mask, logprobs = flatten_output(out)
            fields.update(
                prompt_ids=prompt.token_ids, output_ids=ids, loss_mask=mask, behaviour_logprobs=logprobs
            )
        return TrajectoryRecord(
            env=self.spec.name,
            split=ep.task.split,
            task_id=ep.task.id,
            role=role,
            trial=ep.trial,
            adapter_version=policy.info.version,
            source=policy.info.name,
            prompt=prompt.text,
            segments=[OutputSegment(kind=s.kind, text=s.text) for s in out],  # type: ignore[arg-type]
            reward=ep.reward,
            **fields,  # type: ignore[arg-type]
        )

    # -- reflection round over the failed episodes of one trial
    def reflect(self, failed: list[_Episode]) -> dict[str, tuple[str, TrajectoryRecord]]:
        assert self.reflector is not None
        style = self.spec.prompts
        requests = []
        for ep in failed:
            seen = ep.memory if self.spec.reflector_sees_memory else ()
            text = prompts.reflector_prompt(style, seen, ep.first_obs, ep.history, fewshot=self.cfg.fewshot)
            view = ReflectorView(ep.task, ep.first_obs, ep.memory, tuple(ep.history), ep.reward, ep.trial)
            requests.append(GenRequest("reflector", [self._segment(self.reflector, "prompt", text)], view))
        gens = self._generate(self.reflector, "reflector", requests, failed[0].trial, -1) if failed else []
        out = {}
        for ep, req, gen in zip(failed, requests, gens, strict=True):
            error = gen.error if gen.finish_reason in ("error", "context") else None
            if error:
                self.stats["errors"] += 1
            output = Segment("model", gen.text, gen.token_ids, gen.logprobs)
            rec = self._record("reflector", self.reflector, ep, req.segments[0], [output], error=error)
            out[ep.task.id] = ("" if error else gen.text.strip(), rec)
        return out


def run_trials(
    env: str | EnvSpec,
    tasks: Sequence[Task],
    planner: Policy,
    reflector: Policy | None,
    config: LoopConfig | None = None,
    *,
    on_episode: Callable[[], None] | None = None,
) -> LoopResult:
    """Run ``config.trials`` trials of every task; returns rewards per task and trial and all records.

    ``on_episode`` is called after every finished planner episode (for progress bars).
    """
    cfg = config or LoopConfig()
    spec = get_spec(env) if isinstance(env, str) else env
    if len({t.id for t in tasks}) != len(tasks):
        raise ValueError("task ids must be unique")
    run = _Runner(spec, planner, reflector, cfg, on_episode)
    envs = {t.id: spec.make(**cfg.env_options) for t in tasks}
    memory: dict[str, tuple[str, ...]] = {t.id: () for t in tasks}
    rewards: dict[str, list[float]] = {t.id: [] for t in tasks}
    successes: dict[str, list[bool]] = {t.id: [] for t in tasks}
    pending: dict[str, TrajectoryRecord] = {}
    open_tasks = list(tasks)
    try:
        for trial in range(cfg.trials):
            episodes = [_Episode(t, envs[t.id], trial, memory[t.id]) for t in open_tasks]
            run.run_trial(episodes)
            for ep in episodes:
                rewards[ep.task.id].append(ep.reward)
                successes[ep.task.id].append(ep.success)
                if ep.task.id in pending:  # the reflection that preceded this trial gets its outcome
                    rec = pending.pop(ep.task.id)
                    rec.next_reward, rec.success = ep.reward, ep.success
            open_tasks = [ep.task for ep in episodes if not ep.success]
            for t in tasks:  # solved tasks keep their reward and success
                if len(rewards[t.id]) < trial + 1:
                    rewards[t.id].append(rewards[t.id][-1])
                    successes[t.id].append(successes[t.id][-1])
            if trial == cfg.trials - 1 or not open_tasks or not (cfg.reflect and reflector):
                continue
            failed = [ep for ep in episodes if not ep.success and not ep.error]
            for task_id, (text, rec) in run.reflect(failed).items():
                run.records.append(rec)
                pending[task_id] = rec
                if text:
                    kept = (*memory[task_id], text)
                    memory[task_id] = kept if spec.memory_size is None else kept[-spec.memory_size :]
    finally:
        run.pool.shutdown(wait=False, cancel_futures=True)
    return LoopResult(
        task_ids=[t.id for t in tasks],
        rewards=[rewards[t.id] for t in tasks],
        successes=[successes[t.id] for t in tasks],
        records=run.records,
        n_errors=run.stats["errors"],
        n_actions=run.stats["actions"],
        n_valid_actions=run.stats["valid"],
        n_repeat_stops=run.stats["repeats"],
    )
